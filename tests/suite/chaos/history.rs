//! A history of client operations (invocation and response, as the client saw them) and the
//! checker that judges it against idemd's promise.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use tonic::Code;

/// What a client asked.
#[derive(Debug, Clone)]
pub enum Call {
    Acquire,
    Complete { fence: u64, body: Vec<u8> },
    Release { fence: u64 },
    Renew { fence: u64 },
    Get,
}

/// What it was told.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Acquired {
        fence: u64,
        expires: SystemTime,
    },
    InProgress,
    /// Acquire found the work done.
    Completed {
        body: Vec<u8>,
    },
    /// Complete stored (or had already stored) this result.
    Stored {
        body: Vec<u8>,
    },
    Released,
    Renewed {
        expires: SystemTime,
    },
    /// Get: the record, if any, and its result when completed.
    Read {
        body: Option<Vec<u8>>,
    },
    Missing,
    /// An error status: code, `ErrorInfo.reason` (empty when idemd sent none) and message.
    Failed {
        code: Code,
        reason: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Op {
    pub worker: usize,
    pub replica: usize,
    pub key: String,
    pub call: Call,
    pub invoked: SystemTime,
    pub returned: SystemTime,
    pub reply: Reply,
}

/// Every operation of a run, in the order responses arrived.
#[derive(Default)]
pub struct History {
    ops: Mutex<Vec<Op>>,
}

impl History {
    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Errors a client may see while the system is faulted: it retries them. Anything else an RPC
/// answers must be a domain answer that the checker judges.
pub fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::DeadlineExceeded)
}

/// Domain refusals that are correct answers in a concurrent run: a lease lost to expiry and
/// takeover, or Renew/Release arriving after the record completed.
fn expected_refusal(code: Code, reason: &str) -> bool {
    code == Code::FailedPrecondition && matches!(reason, "LEASE_NOT_HELD" | "RECORD_COMPLETED")
}

/// One broken promise, with the operations that show it.
pub struct Violation {
    pub key: String,
    pub what: String,
    pub ops: Vec<Op>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {}: {}", self.key, self.what)?;
        let origin = self
            .ops
            .iter()
            .map(|op| op.invoked)
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let at = |t: SystemTime| {
            t.duration_since(origin)
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(-1.0)
        };
        for op in &self.ops {
            writeln!(
                f,
                "  {:>9.3}..{:>9.3} ms  worker {:>2} replica {}  {:?} -> {:?}",
                at(op.invoked),
                at(op.returned),
                op.worker,
                op.replica,
                op.call,
                op.reply
            )?;
        }
        Ok(())
    }
}

/// What the checker counted, for the report.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub ops: usize,
    pub keys: usize,
    pub grants: usize,
    /// Grants on a key whose previous holder neither completed nor released (lease expired).
    pub takeovers: usize,
    pub completes_acknowledged: usize,
    pub replays: usize,
    pub errors: BTreeMap<String, usize>,
}

/// A holder's lease, as far as the history proves it was held.
struct Grant<'a> {
    op: &'a Op,
    fence: u64,
    /// The holder certainly held the lease from `op.returned` until this moment: the lease's
    /// expiry (as extended by acknowledged Renews), or the first Complete/Release it sent.
    held_until: SystemTime,
    ended_by_holder: bool,
}

/// Judges a history: for every key, at most one holder at a time and fencing tokens that grow;
/// after an acknowledged Complete, that exact result and never another grant; every observed
/// result written by some Complete; only retryable errors or correct refusals.
pub fn check(ops: &[Op]) -> (Tally, Vec<Violation>) {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut tally = Tally {
        ops: ops.len(),
        keys: by_key.len(),
        ..Tally::default()
    };
    let mut violations = Vec::new();
    for (key, mut ops) in by_key {
        ops.sort_by_key(|op| op.invoked);
        check_key(key, &ops, &mut tally, &mut violations);
    }
    (tally, violations)
}

fn check_key(key: &str, ops: &[&Op], tally: &mut Tally, violations: &mut Vec<Violation>) {
    // A violation carries the sub-history around it: every call on the key that overlaps the
    // involved calls' span, widened by 100 ms on each side.
    let mut violation = |what: String, involved: Vec<&Op>| {
        let margin = Duration::from_millis(100);
        let from = involved.iter().map(|op| op.invoked).min();
        let to = involved.iter().map(|op| op.returned).max();
        let context = match (from, to) {
            (Some(from), Some(to)) => ops
                .iter()
                .filter(|op| op.returned + margin >= from && op.invoked <= to + margin)
                .map(|op| (*op).clone())
                .collect(),
            _ => Vec::new(),
        };
        violations.push(Violation {
            key: key.to_string(),
            what,
            ops: context,
        });
    };

    // Errors: retryable codes or correct refusals, never INTERNAL, UNKNOWN or anything else.
    for op in ops {
        if let Reply::Failed { code, reason, .. } = &op.reply {
            let label = if reason == super::workload::CONNECTION_LOST {
                "ConnectionLost".to_string()
            } else {
                format!("{code:?}")
            };
            *tally.errors.entry(label).or_default() += 1;
            if !retryable(*code) && !expected_refusal(*code, reason) {
                violation(format!("unexpected error {code:?} {reason}"), vec![op]);
            }
        }
    }

    // Grants, and how long each was certainly held.
    let mut grants: Vec<Grant> = Vec::new();
    for op in ops {
        let Reply::Acquired { fence, expires } = op.reply else {
            continue;
        };
        let mut held_until = expires;
        let mut ended_by_holder = false;
        for later in ops.iter().filter(|later| later.worker == op.worker) {
            match (&later.call, &later.reply) {
                (Call::Renew { fence: f }, Reply::Renewed { expires }) if *f == fence => {
                    held_until = held_until.max(*expires);
                }
                (Call::Complete { fence: f, .. } | Call::Release { fence: f }, _)
                    if *f == fence =>
                {
                    ended_by_holder = true;
                }
                _ => {}
            }
        }
        if let Some(end) = ops
            .iter()
            .filter(|later| later.worker == op.worker)
            .filter_map(|later| match later.call {
                Call::Complete { fence: f, .. } | Call::Release { fence: f } if f == fence => {
                    Some(later.invoked)
                }
                _ => None,
            })
            .min()
        {
            held_until = held_until.min(end);
        }
        grants.push(Grant {
            op,
            fence,
            held_until,
            ended_by_holder,
        });
    }
    tally.grants += grants.len();
    grants.sort_by_key(|grant| grant.op.invoked);
    tally.takeovers += grants
        .windows(2)
        .filter(|pair| !pair[0].ended_by_holder)
        .count();

    for (i, a) in grants.iter().enumerate() {
        for b in grants.iter().skip(i + 1) {
            // Real-time order must agree with fencing order.
            let (first, second) = if a.op.returned <= b.op.invoked {
                (a, b)
            } else if b.op.returned <= a.op.invoked {
                (b, a)
            } else {
                // Concurrent calls: still, no two grants may share a fencing token.
                if a.fence == b.fence {
                    violation(
                        format!("two grants with fencing token {}", a.fence),
                        vec![a.op, b.op],
                    );
                }
                continue;
            };
            if second.fence <= first.fence {
                violation(
                    format!(
                        "fencing token went from {} to {} across holders",
                        first.fence, second.fence
                    ),
                    vec![first.op, second.op],
                );
            }
            // Exclusivity: the second grant happened wholly while the first was certainly held.
            if second.op.invoked >= first.op.returned && second.op.returned <= first.held_until {
                violation(
                    "two holders at once: a grant while the previous lease was live".into(),
                    vec![first.op, second.op],
                );
            }
        }
    }

    // Results.
    let written: Vec<&Vec<u8>> = ops
        .iter()
        .filter_map(|op| match &op.call {
            Call::Complete { body, .. } => Some(body),
            _ => None,
        })
        .collect();
    let observed = |op: &Op| -> Option<Vec<u8>> {
        match &op.reply {
            Reply::Completed { body } | Reply::Stored { body } => Some(body.clone()),
            Reply::Read { body } => body.clone(),
            _ => None,
        }
    };
    let mut first_seen: Option<(&Op, Vec<u8>)> = None;
    for op in ops {
        let Some(body) = observed(op) else { continue };
        if !written.contains(&&body) {
            violation("a result no Complete ever sent".into(), vec![op]);
        }
        match &first_seen {
            None => first_seen = Some((op, body)),
            Some((first, seen)) if *seen != body => {
                violation("the stored result changed".into(), vec![*first, op]);
            }
            Some(_) => {}
        }
        if matches!(op.reply, Reply::Completed { .. }) {
            tally.replays += 1;
        }
    }

    // After an acknowledged Complete: never another grant, and every read shows the result.
    let acknowledged: Vec<&&Op> = ops
        .iter()
        .filter(|op| matches!(op.reply, Reply::Stored { .. }))
        .collect();
    tally.completes_acknowledged += acknowledged.len();
    if let Some(complete) = acknowledged.iter().min_by_key(|op| op.returned) {
        for op in ops.iter().filter(|op| op.invoked >= complete.returned) {
            match &op.reply {
                Reply::Acquired { .. } => violation(
                    "acquired again after an acknowledged Complete".into(),
                    vec![complete, op],
                ),
                Reply::InProgress | Reply::Missing | Reply::Read { body: None } => violation(
                    "an acknowledged Complete is not visible".into(),
                    vec![complete, op],
                ),
                _ => {}
            }
        }
    }
}

/// Formats a duration in milliseconds for tables.
pub fn millis(duration: Duration) -> String {
    format!("{:.0}", duration.as_secs_f64() * 1e3)
}
