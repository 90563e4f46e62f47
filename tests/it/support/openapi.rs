//! GitHub's own OpenAPI description (npm `@octokit/openapi`, `generated/api.github.com.json`),
//! used to check every request latchkey sends to the GitHub double and every answer the double
//! gives. `scripts/test.sh` installs the package and exports the file's path.
//!
//! The description is OpenAPI 3.0, whose schemas are JSON Schema with one twist: `nullable`. Each
//! checked schema is cut out of the document with the components it references (transitively),
//! `nullable: true` is rewritten as a union with `null`, and the result is compiled once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Map, Value, json};

use super::peers::peer_var;

/// Set by `scripts/test.sh` to the path of `api.github.com.json`.
pub const OPENAPI_VAR: &str = "LATCHKEY_TEST_GITHUB_OPENAPI";

/// A compiled schema, or `None` when the description gives none.
type Compiled = Option<Arc<jsonschema::Validator>>;

pub struct GithubOpenApi {
    doc: Value,
    /// (operation id, "request" | status) → compiled validator; `None` when the description gives
    /// no schema for it.
    compiled: Mutex<HashMap<(String, String), Compiled>>,
}

impl std::fmt::Debug for GithubOpenApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GithubOpenApi")
    }
}

impl GithubOpenApi {
    /// The description, read once per test process; `None` (the test skips) when the test script
    /// did not provide it, a failure under `LATCHKEY_REQUIRE_PEERS=1`.
    pub fn get() -> Option<Arc<GithubOpenApi>> {
        static DOC: OnceLock<Option<Arc<GithubOpenApi>>> = OnceLock::new();
        DOC.get_or_init(|| {
            let path = peer_var(OPENAPI_VAR, "GitHub OpenAPI description")?;
            let text = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
            let doc: Value = serde_json::from_slice(&text).expect("GitHub's OpenAPI description parses");
            assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.0")), "an OpenAPI 3.0 description");
            Some(Arc::new(GithubOpenApi { doc, compiled: Mutex::new(HashMap::new()) }))
        })
        .clone()
    }

    /// The operation object with this `operationId`, and its method and path.
    fn operation(&self, id: &str) -> (&str, &str, &Value) {
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("a path item") {
                if op.get("operationId").and_then(Value::as_str) == Some(id) {
                    return (method, path, op);
                }
            }
        }
        panic!("GitHub's description has no operation {id}")
    }

    /// A schema from `components/schemas`, as written.
    pub fn schema(&self, name: &str) -> Value {
        self.doc["components"]["schemas"][name].clone()
    }

    /// An example value from `components/examples`.
    pub fn example(&self, name: &str) -> Value {
        self.doc["components"]["examples"][name]["value"].clone()
    }

    /// Checks a request body against the operation's `requestBody`.
    pub fn check_request(&self, operation: &str, body: Option<&Value>) -> Result<(), String> {
        let (_, _, op) = self.operation(operation);
        let request = self.deref(&op["requestBody"]);
        let required = request.get("required").and_then(Value::as_bool).unwrap_or(false);
        match (body, request.pointer("/content/application~1json/schema")) {
            (None, _) if required => Err(format!("{operation}: the request body is required")),
            (None, _) => Ok(()),
            (Some(_), None) => Err(format!("{operation}: takes no request body")),
            (Some(body), Some(_)) => self.validate(operation, "request", body),
        }
    }

    /// Checks an answer against the operation's response for `status`. A status the operation
    /// does not describe must at least be one of GitHub's documented error shapes.
    pub fn check_response(&self, operation: &str, status: u16, body: Option<&Value>) -> Result<(), String> {
        let (_, _, op) = self.operation(operation);
        let described = op["responses"].get(status.to_string()).is_some();
        if !described && status < 400 {
            return Err(format!("{operation}: GitHub never answers {status}"));
        }
        let key = if described { status.to_string() } else { "basic-error".to_owned() };
        match body {
            Some(body) => self.validate(operation, &key, body),
            None if self.schema_for(operation, &key).is_some() => {
                Err(format!("{operation}: answer {status} needs a body"))
            }
            None => Ok(()),
        }
    }

    fn validate(&self, operation: &str, key: &str, value: &Value) -> Result<(), String> {
        let cache_key = (operation.to_owned(), key.to_owned());
        let validator = {
            let mut cache = self.compiled.lock().unwrap();
            cache
                .entry(cache_key)
                .or_insert_with(|| {
                    self.schema_for(operation, key)
                        .map(|schema| Arc::new(jsonschema::validator_for(&schema).expect("GitHub's schema compiles")))
                })
                .clone()
        };
        let Some(validator) = validator else {
            return Err(format!("{operation}: no schema for {key}"));
        };
        let errors: Vec<String> =
            validator.iter_errors(value).take(5).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        if errors.is_empty() { Ok(()) } else { Err(format!("{operation} {key}: {}", errors.join("; "))) }
    }

    /// A standalone JSON Schema for one request or answer of an operation.
    fn schema_for(&self, operation: &str, key: &str) -> Option<Value> {
        let (_, _, op) = self.operation(operation);
        let root = match key {
            "request" => self.deref(&op["requestBody"]).pointer("/content/application~1json/schema")?.clone(),
            "basic-error" => json!({ "$ref": "#/components/schemas/basic-error" }),
            status => self.deref(&op["responses"][status]).pointer("/content/application~1json/schema")?.clone(),
        };
        // Collect the components the schema needs, transitively.
        let mut wanted = BTreeSet::new();
        let mut queue = vec![root.clone()];
        while let Some(v) = queue.pop() {
            for r in refs(&v) {
                if wanted.insert(r.clone()) {
                    queue.push(self.resolve(&r).clone());
                }
            }
        }
        let mut schemas = Map::new();
        for r in wanted {
            let name = r.trim_start_matches("#/components/schemas/").to_owned();
            schemas.insert(name, nullable_to_union(self.resolve(&r).clone()));
        }
        let mut schema = nullable_to_union(root);
        if let Value::Object(m) = &mut schema {
            m.insert("components".into(), json!({ "schemas": schemas }));
        } else {
            schema = json!({ "allOf": [schema], "components": { "schemas": schemas } });
        }
        Some(schema)
    }

    fn resolve(&self, reference: &str) -> &Value {
        let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("an external $ref {reference}"));
        self.doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {reference}"))
    }

    /// Follows a `$ref` at the top of a response or request-body object.
    fn deref<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => self.resolve(r),
            None => v,
        }
    }
}

/// Every `$ref` string inside a value.
fn refs(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => out.extend(refs(v)),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| out.extend(refs(v))),
        _ => {}
    }
    out
}

/// OpenAPI 3.0's `nullable: true` as JSON Schema: `null` is also allowed.
fn nullable_to_union(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut m: Map<String, Value> = m.into_iter().map(|(k, v)| (k, nullable_to_union(v))).collect();
            if m.remove("nullable") == Some(Value::Bool(true)) {
                return json!({ "anyOf": [Value::Object(m), { "type": "null" }] });
            }
            Value::Object(m)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(nullable_to_union).collect()),
        other => other,
    }
}
