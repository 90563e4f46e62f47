//! jwt backend
