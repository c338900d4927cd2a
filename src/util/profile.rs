//! Where a training step spends its ops, bytes and time.
//!
//! - **Phases** (forward, LM head, backward, gradient norm, optimizer): the trainer and the LM
//!   head call `phase` at their boundaries. The call lands in `mo_align_phase`, an empty
//!   un-inlined function a debugger can break on: `scripts/count-ops.sh` counts every candle
//!   backend op (each is one kernel launch, memset or copy on CUDA) per phase that way, on the
//!   CPU, without any code in the step knowing.
//! - **Scopes** (`MO_ALIGN_SCOPE_TIMERS=1`): named regions (embedding, per-layer attention and
//!   MLP forward and backward, LM head, loss, gradient norm, optimizer). On the CPU each records
//!   wall time; on CUDA a host timestamp and a CUDA event at both ends, with one
//!   synchronisation when the table is printed, so host and device time are told apart.
//! - **Tally**: every kernel of `crate::kernels` adds its launches and the bytes it reads and
//!   writes to the innermost open scope (counted whether or not timers are on), which gives the
//!   byte accounting of a step (`take_tally`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

/// The phases of an optimizer step, as `scripts/count-ops.sh` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Phase {
    Other = 0,
    Forward = 1,
    LmHead = 2,
    Backward = 3,
    GradNorm = 4,
    Optimizer = 5,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Other,
        Phase::Forward,
        Phase::LmHead,
        Phase::Backward,
        Phase::GradNorm,
        Phase::Optimizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Other => "other",
            Phase::Forward => "forward",
            Phase::LmHead => "lm_head",
            Phase::Backward => "backward",
            Phase::GradNorm => "grad_norm",
            Phase::Optimizer => "optimizer",
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Phase> = const { RefCell::new(Phase::Other) };
}

/// The last phase entered and counting window opened, as the debugger hooks saw them (each
/// hook writes its own, so the linker cannot fold the two into one function).
static LAST_PHASE: AtomicU32 = AtomicU32::new(0);
static LAST_WINDOW: AtomicU32 = AtomicU32::new(0);

/// The debugger's hook: called with the phase every time one begins.
#[no_mangle]
#[inline(never)]
pub extern "C" fn mo_align_phase(id: u32) {
    // SAFETY: a volatile write to a static's own cell (volatile, so it is not optimised away).
    unsafe { std::ptr::write_volatile(LAST_PHASE.as_ptr(), id) };
}

/// The debugger's other hook: `id > 0` opens counting window `id`, 0 closes it (the `count-*`
/// benchmark cases open one around the step they count).
#[no_mangle]
#[inline(never)]
pub extern "C" fn mo_align_count_window(id: u32) {
    // SAFETY: as in `mo_align_phase`.
    unsafe { std::ptr::write_volatile(LAST_WINDOW.as_ptr(), id) };
}

pub fn count_window(id: u32) {
    mo_align_count_window(id);
}

/// Enters `p` until the guard drops (then the enclosing phase continues).
pub fn phase(p: Phase) -> PhaseGuard {
    let prev = CURRENT.with(|c| c.replace(p));
    mo_align_phase(p as u32);
    PhaseGuard { prev }
}

pub struct PhaseGuard {
    prev: Phase,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.prev);
        mo_align_phase(self.prev as u32);
    }
}

static TIMERS: crate::util::switch::EnvSwitch =
    crate::util::switch::EnvSwitch::new("MO_ALIGN_SCOPE_TIMERS");

/// Whether scopes are timed (`MO_ALIGN_SCOPE_TIMERS=1`, or `set_timers`).
pub fn timers_on() -> bool {
    TIMERS.get(false)
}

pub fn set_timers(on: bool) {
    TIMERS.set(on);
}

/// Launches and bytes moved (read + written) by the kernels of one scope.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub ops: u64,
    pub bytes: u64,
}

/// What the scopes of a thread collected since the last `take_*`.
#[derive(Default)]
struct Book {
    open: Vec<OpenScope>,
    tally: BTreeMap<String, Tally>,
    /// Per scope: (calls, host seconds, device events to resolve).
    times: BTreeMap<String, ScopeTime>,
}

struct OpenScope {
    name: String,
    host_start: Option<Instant>,
    #[cfg(feature = "cuda")]
    event_start: Option<gpu::Event>,
}

#[derive(Default)]
struct ScopeTime {
    calls: u64,
    host_s: f64,
    #[cfg(feature = "cuda")]
    events: Vec<(gpu::Event, gpu::Event)>,
}

thread_local! {
    static BOOK: RefCell<Book> = RefCell::new(Book::default());
}

/// Opens scope `name` on `device` until the guard drops. Scopes nest; kernels tally into the
/// innermost one. Without timers only the name is kept (for the tally).
pub fn scope(name: impl Into<String>, device: &candle_core::Device) -> ScopeGuard {
    let name = name.into();
    let timed = timers_on();
    #[cfg(feature = "cuda")]
    let event_start = if timed {
        gpu::Event::record(device)
    } else {
        None
    };
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    BOOK.with(|b| {
        b.borrow_mut().open.push(OpenScope {
            name,
            host_start: timed.then(Instant::now),
            #[cfg(feature = "cuda")]
            event_start,
        })
    });
    ScopeGuard {
        #[cfg(feature = "cuda")]
        device: device.clone(),
    }
}

pub struct ScopeGuard {
    #[cfg(feature = "cuda")]
    device: candle_core::Device,
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        BOOK.with(|b| {
            let mut b = b.borrow_mut();
            let Some(open) = b.open.pop() else { return };
            let Some(start) = open.host_start else { return };
            let t = b.times.entry(open.name).or_default();
            t.calls += 1;
            t.host_s += start.elapsed().as_secs_f64();
            #[cfg(feature = "cuda")]
            if let (Some(s), Some(e)) = (open.event_start, gpu::Event::record(&self.device)) {
                t.events.push((s, e));
            }
        });
    }
}

/// Adds one kernel's launches and bytes to the innermost open scope ("(none)" outside any),
/// under `scope/kernel`.
pub fn tally(ops: u64, bytes: u64) {
    tally_op("", ops, bytes)
}

/// `tally` for kernel `op` (its name joins the scope's in the key, unless the scope is the
/// op's own timing scope).
pub fn tally_op(op: &str, ops: u64, bytes: u64) {
    BOOK.with(|b| {
        let mut b = b.borrow_mut();
        let scope = b.open.last().map_or("(none)", |s| s.name.as_str());
        let key = if op.is_empty() || scope.ends_with(&format!("/{op}")) {
            scope.to_string()
        } else {
            format!("{scope}/{op}")
        };
        let t = b.tally.entry(key).or_default();
        t.ops += ops;
        t.bytes += bytes;
    });
}

/// With timers on, a scope around one kernel named after it inside the current scope
/// (`attention.forward/mo-gemm`), so the table times every op of a layer; `None` otherwise.
pub fn op_scope(op: &str, device: &candle_core::Device) -> Option<ScopeGuard> {
    if !timers_on() {
        return None;
    }
    let parent = BOOK.with(|b| {
        b.borrow()
            .open
            .last()
            .map_or_else(|| "(none)".to_string(), |s| s.name.clone())
    });
    Some(scope(format!("{parent}/{op}"), device))
}

/// The tally per scope since the last call, and clears it.
pub fn take_tally() -> BTreeMap<String, Tally> {
    BOOK.with(|b| std::mem::take(&mut b.borrow_mut().tally))
}

/// One row of the scope-timer table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScopeRow {
    pub scope: String,
    pub calls: u64,
    pub host_ms: f64,
    /// Device milliseconds between the scope's two CUDA events (None on the CPU).
    pub device_ms: Option<f64>,
}

/// The timed scopes since the last call (waits for the device once), and clears them.
pub fn take_times() -> Vec<ScopeRow> {
    let times = BOOK.with(|b| std::mem::take(&mut b.borrow_mut().times));
    times
        .into_iter()
        .map(|(scope, t)| {
            #[cfg(feature = "cuda")]
            let device_ms = if t.events.is_empty() {
                None
            } else {
                Some(t.events.iter().map(|(s, e)| gpu::elapsed_ms(s, e)).sum())
            };
            #[cfg(not(feature = "cuda"))]
            let device_ms = None;
            ScopeRow {
                scope,
                calls: t.calls,
                host_ms: t.host_s * 1e3,
                device_ms,
            }
        })
        .collect()
}

/// The scope table as aligned text, slowest host scopes first.
pub fn format_times(rows: &[ScopeRow]) -> String {
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| b.host_ms.total_cmp(&a.host_ms));
    let mut out = format!(
        "{:<32} {:>7} {:>10} {:>10}\n",
        "scope", "calls", "host ms", "device ms"
    );
    for r in rows {
        let dev = r.device_ms.map_or("-".to_string(), |d| format!("{d:.3}"));
        out.push_str(&format!(
            "{:<32} {:>7} {:>10.3} {:>10}\n",
            r.scope, r.calls, r.host_ms, dev
        ));
    }
    out
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent};
    use candle_core::Device;

    /// A CUDA event recorded on the device's stream, with timing on.
    pub struct Event(CudaEvent);

    impl Event {
        pub fn record(device: &Device) -> Option<Event> {
            let Device::Cuda(dev) = device else {
                return None;
            };
            let stream = dev.cuda_stream();
            let ev = stream
                .context()
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .ok()?;
            ev.record(&stream).ok()?;
            Some(Event(ev))
        }
    }

    /// Milliseconds between two recorded events (synchronises on the second).
    pub fn elapsed_ms(start: &Event, end: &Event) -> f64 {
        let _ = end.0.synchronize();
        start.0.elapsed_ms(&end.0).map_or(f64::NAN, |ms| ms as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_tally_into_the_innermost_scope_and_timers_record_calls() {
        set_timers(true);
        let dev = candle_core::Device::Cpu;
        take_tally();
        take_times();
        {
            let _outer = scope("outer", &dev);
            tally(1, 10);
            {
                let _inner = scope("inner", &dev);
                tally(2, 5);
                tally(1, 1);
            }
        }
        let t = take_tally();
        assert_eq!(t["outer"], Tally { ops: 1, bytes: 10 });
        assert_eq!(t["inner"], Tally { ops: 3, bytes: 6 });
        let times = take_times();
        assert_eq!(times.len(), 2);
        assert!(times.iter().all(|r| r.calls == 1 && r.host_ms >= 0.0));
        set_timers(false);
    }

    #[test]
    fn phases_nest_and_restore() {
        {
            let _f = phase(Phase::Forward);
            {
                let _h = phase(Phase::LmHead);
                assert_eq!(CURRENT.with(|c| *c.borrow()), Phase::LmHead);
            }
            assert_eq!(CURRENT.with(|c| *c.borrow()), Phase::Forward);
        }
        assert_eq!(CURRENT.with(|c| *c.borrow()), Phase::Other);
    }
}
