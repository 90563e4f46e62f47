//! The broker's own view, from its `/metrics`: how long it spent inside each exchange. Next to
//! the client's latency this separates server time from queueing and client overhead. Best
//! effort: when the metric is missing the report simply leaves it out.

use std::time::Duration;

/// The server-side exchange-time histogram's running totals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExchangeTimes {
    pub seconds: f64,
    pub count: f64,
}

const SUM: &str = "latchkey_exchange_duration_seconds_sum";
const COUNT: &str = "latchkey_exchange_duration_seconds_count";

pub async fn scrape(client: &reqwest::Client, base_url: &str) -> Option<ExchangeTimes> {
    let response = client.get(format!("{base_url}/metrics")).timeout(Duration::from_secs(2)).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    parse(&response.text().await.ok()?)
}

fn parse(text: &str) -> Option<ExchangeTimes> {
    // Unlabelled samples: `name value` (OpenMetrics may append a timestamp or exemplar).
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(ExchangeTimes { seconds: value(SUM)?, count: value(COUNT)? })
}

/// Mean server-side time in ms and the number of exchanges between two scrapes.
pub fn mean_between(before: ExchangeTimes, after: ExchangeTimes) -> Option<(f64, u64)> {
    let count = after.count - before.count;
    (count > 0.0).then(|| ((after.seconds - before.seconds) / count * 1000.0, count as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_histogram_totals() {
        let text = "# TYPE latchkey_exchange_duration_seconds histogram\n\
            latchkey_exchange_duration_seconds_sum 12.5\n\
            latchkey_exchange_duration_seconds_count 5000\n\
            latchkey_exchange_duration_seconds_bucket{le=\"0.001\"} 10\n\
            # EOF\n";
        let t = parse(text).expect("parsed");
        assert_eq!(t, ExchangeTimes { seconds: 12.5, count: 5000.0 });
        let later = ExchangeTimes { seconds: 22.5, count: 7000.0 };
        assert_eq!(mean_between(t, later), Some((5.0, 2000)));
        assert_eq!(parse("# EOF\n"), None);
    }
}
