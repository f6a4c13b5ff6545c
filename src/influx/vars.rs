//! What a server's `/debug/vars` says about writes and subscriptions: the counters a
//! migration reads to prove its capture complete, and the shard sizes its disk check
//! needs. The parsing lives here, next to the endpoint; callers see numbers.

use serde_json::Value;

use super::{Influx, InfluxError};

/// Forwarding counters of one subscription name on a server.
#[derive(Debug, Default, Clone)]
pub struct SubStats {
    /// Points the subscriptions delivered, the source's statistics included.
    pub written: u64,
    /// Of `written`, the points of the source's statistics ([`super::MONITOR_DB`]).
    pub monitor_written: u64,
    /// Deliveries the subscriptions failed, but the statistics' (no writer's point, and
    /// they keep coming to a receiver that is gone: a crashed run's).
    pub failed: u64,
    /// Deliveries of the source's statistics the subscriptions failed.
    pub monitor_failed: u64,
    /// Server-wide forwarding drops (cumulative since the server started):
    /// `queue_drops` plus the subscriber service's failures that no listed subscription
    /// shows (`service_failures` − `listed_failures`).
    pub dropped: u64,
    /// Write requests the points writer could not hand to the subscriber service, its
    /// queue being full (`write` `subWriteDrop`).
    pub queue_drops: u64,
    /// The subscriber service's failure count (`subscriber` `writeFailures`): every
    /// subscription's failed deliveries, and each write a subscription's full queue
    /// refused. InfluxDB 1.x keeps it when a subscription is dropped, and forgets that
    /// subscription's own counters.
    pub service_failures: u64,
    /// Failed deliveries over every subscription the server lists now, ours included:
    /// per subscription (database, retention policy, name), its destination that failed
    /// most. The service counts a request once however many of its destinations failed,
    /// so a sum over destinations could hide a drop (found by review); the largest can
    /// only show one too many.
    pub listed_failures: u64,
    /// The subscriptions the server lists now that are not ours: name → failed
    /// deliveries, counted as in `listed_failures`.
    pub others: std::collections::BTreeMap<String, u64>,
    /// When the server process started (`system.started`): every counter above restarts
    /// from zero with it, and its in-memory forwarding queue is lost.
    pub started: Option<String>,
    /// Points that entered the server's points writer since it started (`write`
    /// `pointReq`): counted as a write request arrives, before it is forwarded to any
    /// subscription, whatever its origin (HTTP, a continuous query, `_internal`).
    pub entered: u64,
    /// Points acknowledged over HTTP since the server started (see
    /// [`Influx::http_points_written`]), read in the same snapshot.
    pub http_written: u64,
    /// Write requests that entered the points writer (`write` `req`), counted with
    /// `entered`.
    pub requests: u64,
    /// Write requests the points writer has handed to the subscriber service, or dropped
    /// there for a full queue (`subWriteOk` + `subWriteDrop`): counted after a request
    /// has found its shards, which may take a while (a new shard group waits for the
    /// metadata lock that `CREATE SUBSCRIPTION` also takes).
    pub handed: u64,
    /// Points of HTTP writes the points writer refused (`httpd` `pointsWrittenFail`): each
    /// entered it, and may never have been handed on.
    pub http_failed: u64,
}

/// Whether two reads of a server's counters, `first` then `second`, prove that every
/// point that entered its points writer after `base` (read before the subscriptions
/// named in `first` were made) had been delivered by those subscriptions when `first`
/// was read, and that nothing entered between the reads. A point that entered after the
/// base but before they were live was not forwarded, and keeps the proof from holding. Each point a subscription delivers is counted on entry, so when
/// every request it delivers entered after the base, `first.written` <= entries at
/// `first` <= `second.entered` - base, and equal ends make the middle equal. A request
/// that entered before the base but reached the subscriber service after it (it waited
/// for its shards) breaks that premise: it is handed on without having entered since the
/// base, so as many requests handed on since the base as entered is required; a request
/// refused after it entered (never handed on) could make up for one such, so an HTTP
/// write refused since the base refuses the proof too (a refusal of another origin, e.g.
/// a continuous query's, is not counted anywhere: ARCHITECTURE.md says what remains
/// assumed). A point that enters but is not forwarded to these subscriptions (another
/// database or retention policy, `_internal`'s statistics) keeps the ends apart, as
/// does a restart.
pub fn drained(base: &SubStats, first: &SubStats, second: &SubStats) -> bool {
    first.started == second.started
        && base.started == first.started
        && first.failed == 0
        && second.entered.checked_sub(base.entered) == Some(first.written)
        && second.handed.checked_sub(base.handed) == second.requests.checked_sub(base.requests)
        && second.http_failed == base.http_failed
}

impl Influx {
    /// Points this server has acknowledged over HTTP since it started (the sum of
    /// `pointsWrittenOK` over its `httpd` services).
    pub async fn http_points_written(&self) -> Result<u64, InfluxError> {
        Ok(http_points_written(&self.debug_vars().await?))
    }

    /// What this server is writing right now ([`writes_in_flight`]).
    pub async fn writes_in_flight(&self) -> Result<Option<InFlight>, InfluxError> {
        Ok(writes_in_flight(&self.debug_vars().await?))
    }

    /// The server's HTTP write counters ([`WriteTimes`]).
    pub async fn write_times(&self) -> Result<WriteTimes, InfluxError> {
        Ok(write_times(&self.debug_vars().await?))
    }

    /// Forwarding counters of the subscriptions named `name`.
    pub async fn subscriber_stats(&self, name: &str) -> Result<SubStats, InfluxError> {
        Ok(subscriber_stats(&self.debug_vars().await?, name))
    }

    /// The on-disk size of every shard (`diskBytes`); empty when the server reports none.
    pub async fn shard_disk_bytes(&self) -> Result<Vec<u64>, InfluxError> {
        let vars = self.debug_vars().await?;
        Ok(vars
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| k.starts_with("shard:"))
                    .filter_map(|(_, v)| v.pointer("/values/diskBytes")?.as_u64())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// How many of the subscriptions named `name` on `(database, retention policy)` the
    /// server runs now (a created subscription goes live a moment later).
    pub async fn live_subscriptions(
        &self,
        name: &str,
        on: &[(String, String)],
    ) -> Result<usize, InfluxError> {
        Ok(self
            .live_each(name, on)
            .await?
            .into_iter()
            .filter(|r| *r)
            .count())
    }

    /// For each `(database, retention policy)` of `on`, whether the subscription `name`
    /// on it runs, in that order.
    pub async fn live_each(
        &self,
        name: &str,
        on: &[(String, String)],
    ) -> Result<Vec<bool>, InfluxError> {
        let vars = self.debug_vars().await?;
        Ok(live_each(&vars, name, on).collect())
    }

    /// [`Self::live_each`], with the counters of [`Self::subscriber_stats`] read in the
    /// same request.
    pub async fn live_each_and_stats(
        &self,
        name: &str,
        on: &[(String, String)],
    ) -> Result<(Vec<bool>, SubStats), InfluxError> {
        let vars = self.debug_vars().await?;
        Ok((
            live_each(&vars, name, on).collect(),
            subscriber_stats(&vars, name),
        ))
    }
}

/// Whether each subscription `name` on `on` runs, in one `/debug/vars` answer: the
/// subscriber service shows one it runs as `subscriber:<db>:<rp>:<name>:<destination>`.
fn live_each<'a>(
    vars: &'a Value,
    name: &'a str,
    on: &'a [(String, String)],
) -> impl Iterator<Item = bool> + 'a {
    on.iter().map(move |(db, rp)| {
        let prefix = format!("subscriber:{db}:{rp}:{name}:");
        vars.as_object()
            .is_some_and(|o| o.keys().any(|k| k.starts_with(&prefix)))
    })
}

/// A server's HTTP write requests, read in one `/debug/vars` answer and summed over its
/// `httpd` services: what the write-time guard measures the writers by. InfluxDB 1.x
/// counts a request in `writeReq` and `writeReqActive` when it arrives, and adds its time
/// to `writeReqDurationNs` when it is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteTimes {
    /// Requests arrived since the server started (`writeReq`).
    pub arrived: u64,
    /// Being served now (`writeReqActive`).
    pub active: u64,
    /// The time of every request answered, arrival to answer (`writeReqDurationNs`).
    pub nanos: u64,
}

impl WriteTimes {
    /// Requests answered since the server started.
    pub fn answered(&self) -> u64 {
        self.arrived.saturating_sub(self.active)
    }
}

fn write_times(vars: &Value) -> WriteTimes {
    WriteTimes {
        arrived: httpd_sum(vars, "/values/writeReq"),
        active: httpd_sum(vars, "/values/writeReqActive"),
        nanos: httpd_sum(vars, "/values/writeReqDurationNs"),
    }
}

/// Writes a server has begun and not ended, read in one `/debug/vars` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// HTTP write requests being served (`httpd` `writeReqActive`, InfluxDB's gauge of
    /// `/write` and Prometheus writes between arrival and answer).
    pub http: u64,
    /// Shard writes begun and not ended, of any origin (a continuous query's output,
    /// UDP, …): per shard `writeReq` − `writeReqOk` − `writeReqErr`, summed. A write a
    /// shard refused before its engine saw it is counted in none of the two ends, so a
    /// shard that ever refused one stays above 0 until its server restarts.
    pub shards: u64,
}

/// What `vars` says is being written; `None` when no HTTP service reports
/// `writeReqActive` (the server cannot say).
fn writes_in_flight(vars: &Value) -> Option<InFlight> {
    let obj = vars.as_object()?;
    let reported = obj
        .iter()
        .any(|(k, v)| k.starts_with("httpd") && v.pointer("/values/writeReqActive").is_some());
    if !reported {
        return None;
    }
    let shards = obj
        .iter()
        .filter(|(k, _)| k.starts_with("shard:"))
        .map(|(_, v)| {
            num(v, "/values/writeReq")
                .saturating_sub(num(v, "/values/writeReqOk"))
                .saturating_sub(num(v, "/values/writeReqErr"))
        })
        .sum();
    Some(InFlight {
        http: httpd_sum(vars, "/values/writeReqActive"),
        shards,
    })
}

fn num(v: &Value, p: &str) -> u64 {
    v.pointer(p).and_then(Value::as_u64).unwrap_or(0)
}

fn http_points_written(vars: &Value) -> u64 {
    httpd_sum(vars, "/values/pointsWrittenOK")
}

/// One counter summed over the server's `httpd` services.
fn httpd_sum(vars: &Value, pointer: &str) -> u64 {
    vars.as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| k.starts_with("httpd"))
                .map(|(_, v)| num(v, pointer))
                .sum()
        })
        .unwrap_or(0)
}

fn subscriber_stats(vars: &Value, name: &str) -> SubStats {
    let mut st = SubStats::default();
    let Some(obj) = vars.as_object() else {
        return st;
    };
    let mut per_sub: std::collections::BTreeMap<(&str, &str, &str), u64> = Default::default();
    for (k, v) in obj {
        if !k.starts_with("subscriber:") {
            continue;
        }
        let failures = num(v, "/values/writeFailures");
        let tag = |t: &str| {
            v.pointer(&format!("/tags/{t}"))
                .and_then(Value::as_str)
                .unwrap_or("?")
        };
        let sub = per_sub
            .entry((tag("database"), tag("retention_policy"), tag("name")))
            .or_default();
        *sub = (*sub).max(failures);
        if tag("name") == name {
            let written = num(v, "/values/pointsWritten");
            st.written += written;
            if tag("database") == super::MONITOR_DB {
                st.monitor_written += written;
                st.monitor_failed += failures;
            } else {
                st.failed += failures;
            }
        }
    }
    for ((_, _, n), failures) in per_sub {
        st.listed_failures += failures;
        if n != name {
            *st.others.entry(n.to_string()).or_default() += failures;
        }
    }
    // Drops that never reach a subscription's own counters: the points writer's queue to
    // the subscriber service, and the service's per-subscription queues.
    if let Some(w) = obj.get("write") {
        st.queue_drops = num(w, "/values/subWriteDrop");
        st.entered = num(w, "/values/pointReq");
        st.requests = num(w, "/values/req");
        st.handed = num(w, "/values/subWriteOk") + num(w, "/values/subWriteDrop");
    }
    st.http_written = http_points_written(vars);
    st.http_failed = httpd_sum(vars, "/values/pointsWrittenFail");
    st.started = obj
        .get("system")
        .and_then(|v| v.get("started"))
        .and_then(Value::as_str)
        .map(str::to_string);
    // The service-level failure count includes every subscription's delivery failures;
    // what exceeds their sum is queue-full drops, or failures of a subscription the
    // server no longer lists.
    if let Some(sv) = obj.get("subscriber") {
        st.service_failures = num(sv, "/values/writeFailures");
    }
    st.dropped = st.queue_drops + st.service_failures.saturating_sub(st.listed_failures);
    st
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn write_times_are_the_http_services_counters_summed() {
        let vars = json!({
            "httpd:127.0.0.1:8086": {"values": {"writeReq": 10, "writeReqActive": 1, "writeReqDurationNs": 9_000_000, "req": 50}},
            "httpd:[::1]:8086": {"values": {"writeReq": 5, "writeReqActive": 0, "writeReqDurationNs": 1_000_000}},
            "shard:/d/1": {"values": {"writeReq": 99}},
        });
        let w = super::write_times(&vars);
        assert_eq!(
            w,
            super::WriteTimes {
                arrived: 15,
                active: 1,
                nanos: 10_000_000
            }
        );
        assert_eq!(w.answered(), 14);
        assert_eq!(super::write_times(&json!({})), super::WriteTimes::default());
    }

    #[test]
    fn subscriber_counters_are_ours_and_drops_are_what_the_service_counts_beyond_them() {
        let vars = json!({
            "system": {"started": "2026-11-30T05:00:00Z"},
            "write": {"values": {"subWriteDrop": 2, "pointReq": 123, "req": 12, "subWriteOk": 9}},
            "subscriber": {"values": {"writeFailures": 10}},
            "subscriber:db:autogen:stateshift_1:http://a": {
                "tags": {"database": "db", "retention_policy": "autogen", "name": "stateshift_1"},
                "values": {"pointsWritten": 40, "writeFailures": 3}
            },
            "subscriber:db:autogen:other:http://b": {
                "tags": {"database": "db", "retention_policy": "autogen", "name": "other", "destination": "http://b"},
                "values": {"pointsWritten": 7, "writeFailures": 4}
            },
            // A second destination of the same subscription: the service counted each
            // failed request once, so its failures are not added to the first one's.
            "subscriber:db:autogen:other:http://c": {
                "tags": {"database": "db", "retention_policy": "autogen", "name": "other", "destination": "http://c"},
                "values": {"pointsWritten": 9, "writeFailures": 2}
            },
            "httpd": {"values": {"pointsWrittenOK": 90, "pointsWrittenFail": 4, "writeReqActive": 2}},
            "httpd:2": {"values": {"pointsWrittenOK": 10, "writeReqActive": 1}}
        });
        let st = super::subscriber_stats(&vars, "stateshift_1");
        assert_eq!((st.written, st.failed), (40, 3));
        // 2 queue drops + (10 service failures - 7 counted by the subscriptions).
        assert_eq!(st.dropped, 5);
        assert_eq!(
            (st.queue_drops, st.service_failures, st.listed_failures),
            (2, 10, 7)
        );
        assert_eq!(st.others, [("other".to_string(), 4)].into());
        assert_eq!(st.started.as_deref(), Some("2026-11-30T05:00:00Z"));
        assert_eq!(super::http_points_written(&vars), 100);
        assert_eq!((st.entered, st.http_written), (123, 100));
        assert_eq!((st.requests, st.handed, st.http_failed), (12, 11, 4));
        assert_eq!(super::http_points_written(&json!([])), 0);
        assert_eq!(
            super::writes_in_flight(&vars),
            Some(super::InFlight { http: 3, shards: 0 })
        );
        assert_eq!(
            super::writes_in_flight(&json!({"httpd": {"values": {}}})),
            None
        );
        let busy = json!({
            "httpd": {"values": {"writeReqActive": 0}},
            "shard:/d/1": {"values": {"writeReq": 10, "writeReqOk": 7, "writeReqErr": 1}},
            "shard:/d/2": {"values": {"writeReq": 4, "writeReqOk": 4}}
        });
        assert_eq!(
            super::writes_in_flight(&busy),
            Some(super::InFlight { http: 0, shards: 2 })
        );
    }

    #[test]
    fn the_statistics_a_subscription_forwards_count_as_delivered_and_their_failures_apart() {
        let vars = json!({
            "subscriber": {"values": {"writeFailures": 9}},
            "subscriber:db:autogen:stateshift_1:http://a": {
                "tags": {"database": "db", "retention_policy": "autogen", "name": "stateshift_1"},
                "values": {"pointsWritten": 40, "writeFailures": 2}
            },
            "subscriber:_internal:monitor:stateshift_1:http://a": {
                "tags": {"database": "_internal", "retention_policy": "monitor", "name": "stateshift_1"},
                "values": {"pointsWritten": 300, "writeFailures": 7}
            }
        });
        let st = super::subscriber_stats(&vars, "stateshift_1");
        // The drain's proof compares every delivered point with every entered one.
        assert_eq!((st.written, st.monitor_written), (340, 300));
        // A statistic that failed is no writer's loss; it is still a listed failure.
        assert_eq!((st.failed, st.monitor_failed), (2, 7));
        assert_eq!((st.listed_failures, st.dropped), (9, 0));
    }

    #[test]
    fn the_drain_is_proven_by_equal_ends_from_one_process_with_no_failed_delivery() {
        let st = |entered, written, failed, started: &str| super::SubStats {
            entered,
            written,
            failed,
            started: Some(started.into()),
            requests: entered / 10,
            handed: entered / 10,
            ..Default::default()
        };
        let (a, b) = ("2026-12-01T09:00:00Z", "2026-12-01T09:05:00Z");
        let base = st(100, 0, 0, a);
        let drained = |first: &super::SubStats, second: &super::SubStats| {
            super::drained(&base, first, second)
        };
        assert!(drained(&st(140, 40, 0, a), &st(140, 40, 0, a)));
        // Entered 50 since the base, delivered 40: some are queued (or went elsewhere).
        assert!(!drained(&st(140, 40, 0, a), &st(150, 40, 0, a)));
        // Delivered more than entered: a request from before the base was delivered.
        assert!(!drained(&st(150, 60, 0, a), &st(150, 60, 0, a)));
        assert!(!drained(&st(140, 40, 1, a), &st(140, 40, 1, a)));
        // A restart between the reads, or since the base: counters from zero again.
        assert!(!drained(&st(140, 40, 0, a), &st(140, 40, 0, b)));
        assert!(!drained(&st(140, 40, 0, b), &st(140, 40, 0, b)));
        // Equal points, but more requests handed on than entered since the base: one of
        // them entered before it, and its points may hide a queued one.
        let mut second = st(140, 40, 0, a);
        second.handed += 1;
        assert!(!drained(&st(140, 40, 0, a), &second));
        // ... or one refused after it entered (never handed on), which could hide the
        // former; an HTTP write refused since the base, likewise.
        let mut second = st(140, 40, 0, a);
        second.requests += 1;
        assert!(!drained(&st(140, 40, 0, a), &second));
        let mut second = st(140, 40, 0, a);
        second.http_failed += 5;
        assert!(!drained(&st(140, 40, 0, a), &second));
    }
}
