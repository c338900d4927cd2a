//! Reading held tensors inside our ops, and the element types the CPU twins compute in.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use std::ops::Deref;

/// A tensor's storage, read-locked for the length of an op, with the tensor's layout.
pub(crate) struct Held<'a> {
    guard: Box<dyn Deref<Target = Storage> + 'a>,
    pub layout: &'a Layout,
}

/// Read-locks `t`'s storage (several tensors may share one storage: read locks nest).
pub(crate) fn hold(t: &Tensor) -> Held<'_> {
    let (guard, layout) = t.storage_and_layout();
    Held {
        guard: Box::new(guard),
        layout,
    }
}

impl Held<'_> {
    /// The elements from the view's first one to the end of the storage, on the CPU.
    pub fn cpu<T: WithDType>(&self) -> Result<&[T]> {
        match &**self.guard {
            Storage::Cpu(c) => Ok(&c.as_slice::<T>()?[self.layout.start_offset()..]),
            _ => candle_core::bail!("mo-align kernel: a held tensor is not on the CPU"),
        }
    }

    /// The storage itself (device-side code takes addresses from it).
    #[cfg(feature = "cuda")]
    pub fn storage(&self) -> &Storage {
        &self.guard
    }

    #[cfg(feature = "cuda")]
    pub fn dtype(&self) -> DType {
        self.guard.dtype()
    }
}

/// The floating-point types the CPU twins compute in (f32, and f64 for the finite-difference
/// and golden tests).
pub trait Real:
    WithDType + num_traits::Float + num_traits::NumAssign + Send + Sync + std::iter::Sum
{
    fn of(x: f64) -> Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("mo-align kernel: expected f32 storage"),
        }
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn wrap(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            _ => candle_core::bail!("mo-align kernel: expected f64 storage"),
        }
    }
}

/// Dispatches `$body` with `$t` bound to the Rust type of `$dtype` (f32 or f64; other dtypes
/// have no CPU twin and are refused).
#[macro_export]
macro_rules! with_real {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("mo-align kernel: no CPU twin for {other:?}"),
        }
    };
}

/// Whether the CPU twins compute in `dtype`.
pub fn cpu_supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}

/// A raw pointer that may cross to the worker threads of a parallel loop that writes disjoint
/// parts of one buffer.
pub(crate) struct SendPtr<T>(pub *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// # Safety
    /// `offset..offset + len` is inside the buffer and no other thread touches it meanwhile.
    pub unsafe fn slice_mut<'a>(self, offset: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// Element operations below which a loop runs on the calling thread: waking the pool's other
/// workers for less costs about what it saves (measured on the tiny model's steps, where most
/// loops are this small; thresholds from 2^12 to 2^16 were within noise of each other).
const PARALLEL_WORK: usize = 1 << 14;

/// `f(state, i)` for every i in 0..count; on the thread pool when `work` (element operations in
/// all) pays for it, each worker with its own `init()` state.
pub(crate) fn for_each_index<S, I, F>(count: usize, work: usize, init: I, f: F)
where
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize) + Sync + Send,
{
    use rayon::prelude::*;
    if work < PARALLEL_WORK || count < 2 {
        let mut s = init();
        for i in 0..count {
            f(&mut s, i);
        }
    } else {
        (0..count)
            .into_par_iter()
            .for_each_init(init, |s, i| f(s, i));
    }
}

/// `f(state, i, row_i)` for the rows of `out` (each `width` long), as `for_each_index`.
pub(crate) fn for_rows<T: Send, S, I, F>(out: &mut [T], width: usize, work: usize, init: I, f: F)
where
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [T]) + Sync + Send,
{
    let count = out.len() / width.max(1);
    let ptr = SendPtr(out.as_mut_ptr());
    for_each_index(count, work, init, |s, i| {
        // SAFETY: row i is `width` elements of `out`, touched by call i only.
        let row = unsafe { ptr.slice_mut(i * width, width) };
        f(s, i, row)
    });
}
