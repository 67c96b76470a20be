//! What the consumer runner adds around a handler: the event chain (correlation and causation
//! ids of what the handler publishes) and the upcasters that bring old event versions up to
//! date before the handler sees them.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use crate::bus::Event;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Message, CAUSATION_ID, CORRELATION_ID};

/// The event a handler is handling (shared with its delivery: nothing is copied per
/// delivery).
#[derive(Clone)]
pub(crate) struct Cause(Arc<Message>);

impl Cause {
    pub(crate) fn of(event: &Event) -> Self {
        Self(event.shared_message().clone())
    }
}

tokio::task_local! {
    /// Set while a handler of the consumer runner runs (in the handler's own task).
    pub(crate) static HANDLING: Cause;
}

/// Gives messages published while a handler runs, and not already part of a chain (no
/// correlation id), the handled event's correlation id and its id as causation id.
pub(crate) fn inherit(messages: &mut [Message]) {
    let _ = HANDLING.try_with(|cause| {
        for m in messages
            .iter_mut()
            .filter(|m| m.headers.get(CORRELATION_ID).is_none())
        {
            m.headers.insert(CORRELATION_ID, cause.0.correlation_id());
            m.headers.insert(CAUSATION_ID, cause.0.id.as_str());
        }
    });
}

type UpcastFn =
    Arc<dyn Fn(Message) -> std::result::Result<Message, String> + Send + Sync + 'static>;

/// One step of an event type's version history.
#[derive(Clone)]
struct Upcaster {
    event_type: String,
    from: u32,
    to: u32,
    f: UpcastFn,
}

/// The upcasters of a consumer: each takes an event type from one version to a newer one.
#[derive(Clone, Default)]
pub(crate) struct Upcasters(Vec<Upcaster>);

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.0
                    .iter()
                    .map(|u| format!("{} v{}→v{}", u.event_type, u.from, u.to)),
            )
            .finish()
    }
}

impl Upcasters {
    pub(crate) fn add<F, E>(&mut self, event_type: String, from: u32, to: u32, f: F)
    where
        F: Fn(Message) -> std::result::Result<Message, E> + Send + Sync + 'static,
        E: fmt::Display,
    {
        self.0.push(Upcaster {
            event_type,
            from,
            to,
            f: Arc::new(move |m| f(m).map_err(|e| e.to_string())),
        });
    }

    /// Each step goes from a version ≥ 1 to a newer one, and one version of a type has one
    /// step.
    pub(crate) fn check(&self) -> Result<()> {
        for (i, u) in self.0.iter().enumerate() {
            if u.from == 0 || u.to <= u.from {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "upcaster of {:?} from v{} to v{}: versions start at 1 and go up",
                        u.event_type, u.from, u.to
                    ),
                ));
            }
            if self.0[..i]
                .iter()
                .any(|o| o.event_type == u.event_type && o.from == u.from)
            {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("two upcasters of {:?} from v{}", u.event_type, u.from),
                ));
            }
        }
        Ok(())
    }

    /// `event` brought to the newest version its type's upcasters reach, or `None` when no
    /// upcaster applies. An upcaster's error (or panic) is the error text.
    pub(crate) fn apply(&self, event: &Event) -> std::result::Result<Option<Event>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let mut current: Option<Message> = None;
        loop {
            let m = current.as_ref().unwrap_or(event.message());
            let (Some(t), Some(v)) = (m.event_type.as_deref(), m.version()) else {
                break;
            };
            let Some(u) = self.0.iter().find(|u| u.event_type == t && u.from == v) else {
                break;
            };
            let input = m.clone();
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| (u.f)(input)))
                .unwrap_or_else(|_| Err("the upcaster panicked".to_owned()))
                .map_err(|e| format!("upcasting {t} v{v} to v{}: {e}", u.to))?;
            current = Some(out.with_version(u.to));
        }
        Ok(current.map(|m| event.with_message(m)))
    }
}

#[cfg(test)]
mod tests;
