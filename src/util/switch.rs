//! Process-wide on/off switches read from an environment variable the first time they are asked,
//! and settable from code (tests, benches A/B-ing two paths in one process).

use std::sync::atomic::{AtomicU8, Ordering};

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

pub struct EnvSwitch {
    var: &'static str,
    state: AtomicU8,
}

impl EnvSwitch {
    pub const fn new(var: &'static str) -> Self {
        EnvSwitch {
            var,
            state: AtomicU8::new(UNSET),
        }
    }

    /// `1`/`true`/`on` and `0`/`false`/`off` in the variable decide; anything else (or nothing)
    /// gives `default`. The answer is kept until `set`.
    pub fn get(&self, default: bool) -> bool {
        match self.state.load(Ordering::Relaxed) {
            ON => true,
            OFF => false,
            _ => {
                let env = std::env::var(self.var).ok();
                let on = match env.as_deref().map(str::trim) {
                    Some("1") | Some("true") | Some("on") => true,
                    Some("0") | Some("false") | Some("off") => false,
                    _ => default,
                };
                self.set(on);
                on
            }
        }
    }

    pub fn set(&self, on: bool) {
        self.state
            .store(if on { ON } else { OFF }, Ordering::Relaxed);
    }
}
