//! The CUDA side of the fused kernels: launches of `fused.cuh`'s kernels (through `ops.cu`'s
//! extern "C" entry points) and cuBLAS calls, each mirroring a CPU twin in this folder.
//!
//! Device addresses are taken from the held tensors' storages; a kernel that writes through
//! one of them writes device memory Rust never reads meanwhile (the tensors are candle's, on one
//! stream), so no host-side aliasing rule is involved.

use super::alloc;
use super::cpu::{hold, Held};
use super::spec::{
    total_rank, Adapter, AttnSpec, GateUp, GradSlots, GroupRef, MatView, Projection, QkvSpec,
};
use crate::launch_kernel_cfg;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

/// The suffix of a kernel's instantiation for an activation dtype.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => candle_core::bail!("mo-align CUDA kernels: no kernel for {other:?}"),
    })
}

/// The device address of element `offset` of a storage.
pub(crate) fn address(s: &CudaStorage, offset: usize) -> Result<u64> {
    let stream = s.device.cuda_stream();
    macro_rules! at {
        ($v:expr, $t:ty) => {{
            let (p, _sync) = $v.device_ptr(&stream);
            p + (offset * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match &s.slice {
        CudaStorageSlice::F32(v) => at!(v, f32),
        CudaStorageSlice::BF16(v) => at!(v, half::bf16),
        CudaStorageSlice::F16(v) => at!(v, half::f16),
        CudaStorageSlice::F64(v) => at!(v, f64),
        CudaStorageSlice::U32(v) => at!(v, u32),
        _ => candle_core::bail!("mo-align CUDA kernels: unsupported storage dtype"),
    })
}

/// The device address of a held tensor's first element.
fn held_address(h: &Held) -> Result<u64> {
    match h.storage() {
        Storage::Cuda(s) => address(s, h.layout.start_offset()),
        _ => candle_core::bail!("mo-align CUDA kernels: a held tensor is not on the GPU"),
    }
}

/// A tensor's device address (0 for none), holding it for the launch.
struct Ptrs<'a> {
    held: Vec<Held<'a>>,
}

impl<'a> Ptrs<'a> {
    fn new() -> Self {
        Ptrs { held: vec![] }
    }
    fn of(&mut self, t: &'a Tensor) -> Result<u64> {
        let h = hold(t);
        let p = held_address(&h)?;
        self.held.push(h);
        Ok(p)
    }
    fn opt(&mut self, t: Option<&'a Tensor>) -> Result<u64> {
        t.map_or(Ok(0), |t| self.of(t))
    }
}

// ---- LoRA groups (fused.cuh's MoAdapter / MoGroup) ----------------------------------------

const MAX_ADAPTERS: usize = 4;
const MAX_RANK: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MoAdapter {
    a: u64,
    b: u64,
    gate: u64,
    key: u64,
    threshold: u32,
    has_mask: i32,
    keep: f32,
    scale: f32,
    r: i32,
    u_off: i32,
    out_off: i32,
    out: i32,
    grad_a: u64,
    grad_b: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MoGroup {
    ad: [MoAdapter; MAX_ADAPTERS],
    n: i32,
    inp: i32,
    sum_r: i32,
    width: i32,
}

// SAFETY: plain C structs of integers and floats, passed by value to the kernels.
unsafe impl DeviceRepr for MoGroup {}
unsafe impl DeviceRepr for MoQkv {}
unsafe impl DeviceRepr for MoAttn {}

/// The group as the kernels read it (`width`: the group's output features).
fn group<'a>(
    ptrs: &mut Ptrs<'a>,
    adapters: &'a [Adapter<'a>],
    slots: Option<&[GradSlots]>,
    width: usize,
) -> Result<MoGroup> {
    if adapters.len() > MAX_ADAPTERS {
        candle_core::bail!("mo-align CUDA kernels: at most {MAX_ADAPTERS} adapters per group");
    }
    let mut g = MoGroup {
        n: adapters.len() as i32,
        inp: adapters.first().map_or(0, |a| a.in_features()) as i32,
        sum_r: total_rank(adapters) as i32,
        width: width as i32,
        ..Default::default()
    };
    for (i, a) in adapters.iter().enumerate() {
        let f32s = [Some(a.a), Some(a.b), a.gate];
        if f32s.iter().flatten().any(|t| t.dtype() != DType::F32) {
            candle_core::bail!("mo-align CUDA kernels: adapters and gates must be f32");
        }
        if a.rank() > MAX_RANK {
            candle_core::bail!(
                "mo-align CUDA kernels: adapter rank {} above {MAX_RANK}",
                a.rank()
            );
        }
        let mask = a.dropout.filter(|m| m.p > 0.0);
        g.ad[i] = MoAdapter {
            a: ptrs.of(a.a)?,
            b: ptrs.of(a.b)?,
            gate: ptrs.opt(a.gate)?,
            key: mask.map_or(0, |m| m.key),
            threshold: mask.map_or(0, |m| super::dropout::threshold(m.p)),
            has_mask: mask.is_some() as i32,
            keep: mask.map_or(1.0, |m| 1.0f32 / (1.0f32 - m.p)),
            scale: a.scale as f32,
            r: a.rank() as i32,
            u_off: a.u_offset as i32,
            out_off: a.out_offset as i32,
            out: a.out_features() as i32,
            grad_a: slots.map_or(0, |s| s[i].a as u64),
            grad_b: slots.map_or(0, |s| s[i].b as u64),
        };
    }
    Ok(g)
}

fn smem(floats: usize) -> u32 {
    (floats * 4) as u32
}

fn rows(n: usize) -> u32 {
    n as u32
}

pub(crate) fn lora_down(
    dev: &CudaDevice,
    x: &Tensor,
    adapters: &[Adapter],
    n: usize,
    sum_r: usize,
) -> Result<CudaStorage> {
    let mut ptrs = Ptrs::new();
    let g = group(&mut ptrs, adapters, None, 0)?;
    let px = ptrs.of(x)?;
    let out = alloc(dev, x.dtype(), n * sum_r)?;
    let po = address(&out, 0)?;
    let name = format!("mo_lora_down_{}", suffix(x.dtype())?);
    // fused.cuh stages at most MO_DOWN_CHUNK (4096) input columns at a time.
    let cfg = super::grid(rows(n), 256, smem((g.inp as usize).min(4096)));
    launch_kernel_cfg!(dev, &name, cfg, &px, &po, &g)?;
    Ok(out)
}

pub(crate) fn lora_up_backward(
    dev: &CudaDevice,
    dy: &Tensor,
    adapters: &[Adapter],
    n: usize,
    width: usize,
    sum_r: usize,
) -> Result<CudaStorage> {
    let mut ptrs = Ptrs::new();
    let g = group(&mut ptrs, adapters, None, width)?;
    let py = ptrs.of(dy)?;
    let out = alloc(dev, dy.dtype(), n * sum_r)?;
    let po = address(&out, 0)?;
    let name = format!("mo_lora_up_bwd_{}", suffix(dy.dtype())?);
    launch_kernel_cfg!(dev, &name, super::grid(rows(n), 256, 0), &py, &po, &g)?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_grads(
    dst: &mut CudaStorage,
    offset: usize,
    dy: &Tensor,
    u: &Tensor,
    du: &Tensor,
    x: &Tensor,
    adapters: &[Adapter],
    slots: &[GradSlots],
    n: usize,
) -> Result<()> {
    let dev = dst.device.clone();
    let mut ptrs = Ptrs::new();
    let width = dy.elem_count() / n;
    let g = group(&mut ptrs, adapters, Some(slots), width)?;
    let (py, pu, pdu, px) = (ptrs.of(dy)?, ptrs.of(u)?, ptrs.of(du)?, ptrs.of(x)?);
    let pg = address(dst, offset)?;
    let tiles: usize = adapters
        .iter()
        .map(|a| a.out_features().div_ceil(32) + a.in_features().div_ceil(32))
        .sum();
    let name = format!("mo_lora_grads_{}", suffix(x.dtype())?);
    let n32 = n as i32;
    launch_kernel_cfg!(
        dev,
        &name,
        super::grid(tiles as u32, 256, 0),
        &pg,
        &py,
        &pu,
        &pdu,
        &px,
        &g,
        &n32
    )
}

// ---- norms -------------------------------------------------------------------------------

pub(crate) fn norm_forward(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    add: Option<&Projection>,
    n: usize,
    h: usize,
) -> Result<CudaStorage> {
    let mut ptrs = Ptrs::new();
    let (px, pw) = (ptrs.of(x)?, ptrs.of(w)?);
    let (py, pb, pu, g) = match add {
        Some(p) => (
            ptrs.of(p.y)?,
            ptrs.opt(p.bias)?,
            ptrs.opt(p.u)?,
            group(&mut ptrs, p.adapters, None, h)?,
        ),
        None => (0, 0, 0, MoGroup::default()),
    };
    let parts = if add.is_some() { 2 } else { 1 };
    let out = alloc(dev, x.dtype(), parts * n * h)?;
    let po = address(&out, 0)?;
    let name = format!("mo_residual_norm_{}", suffix(x.dtype())?);
    let (eps, n32, h32, add32) = (eps as f32, n as i32, h as i32, add.is_some() as i32);
    let cfg = super::grid(rows(n), 256, smem(g.sum_r as usize + 32));
    launch_kernel_cfg!(
        dev, &name, cfg, &px, &py, &pb, &pu, &pw, &po, &eps, &n32, &h32, &add32, &g
    )?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_backward(
    dev: &CudaDevice,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
    lora: Option<(&Tensor, &[Adapter])>,
    n: usize,
    h: usize,
) -> Result<CudaStorage> {
    let mut ptrs = Ptrs::new();
    let (pdy, px, pw, pr) = (ptrs.of(dy)?, ptrs.of(x)?, ptrs.of(w)?, ptrs.opt(residual)?);
    let (pdu, g) = match lora {
        Some((du, ads)) => (ptrs.of(du)?, group(&mut ptrs, ads, None, 0)?),
        None => (0, MoGroup::default()),
    };
    let out = alloc(dev, x.dtype(), n * h)?;
    let po = address(&out, 0)?;
    let name = format!("mo_norm_bwd_{}", suffix(x.dtype())?);
    let (eps, h32) = (eps as f32, h as i32);
    let cfg = super::grid(rows(n), 256, smem(h + g.sum_r as usize + 32));
    launch_kernel_cfg!(dev, &name, cfg, &pdy, &px, &pw, &pr, &pdu, &po, &eps, &h32, &g)?;
    Ok(out)
}

// ---- the qkv epilogue ----------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy)]
struct MoQkv {
    batch: i32,
    seq: i32,
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    width: i32,
    has_norm: i32,
    eps: f32,
    q_scale: f32,
}

pub(crate) fn qkv(
    dev: &CudaDevice,
    y: &Tensor,
    spec: &QkvSpec,
    grad: Option<&Tensor>,
) -> Result<CudaStorage> {
    if spec.cos.dtype() != DType::F32 {
        candle_core::bail!("mo-align CUDA kernels: rotary tables must be f32");
    }
    let mut ptrs = Ptrs::new();
    let (py, pb) = (ptrs.of(y)?, ptrs.opt(spec.bias)?);
    let (pu, g) = match spec.lora {
        Some((u, ads)) => (ptrs.of(u)?, group(&mut ptrs, ads, None, spec.width())?),
        None => (0, MoGroup::default()),
    };
    let (pc, ps, pp) = (
        ptrs.of(spec.cos)?,
        ptrs.of(spec.sin)?,
        ptrs.of(spec.positions)?,
    );
    let (pq, pk, eps) = match spec.qk_norm {
        Some((q, k, eps)) => (ptrs.of(q)?, ptrs.of(k)?, eps),
        None => (0, 0, 0.0),
    };
    let pg = ptrs.opt(grad)?;
    let n = spec.batch * spec.seq;
    let out = alloc(dev, y.dtype(), n * spec.width())?;
    let po = address(&out, 0)?;
    let p = MoQkv {
        batch: spec.batch as i32,
        seq: spec.seq as i32,
        heads: spec.heads as i32,
        kv_heads: spec.kv_heads as i32,
        head_dim: spec.head_dim as i32,
        width: spec.width() as i32,
        has_norm: spec.qk_norm.is_some() as i32,
        eps: eps as f32,
        q_scale: (1.0 / (spec.head_dim as f64).sqrt()) as f32,
    };
    let name = format!("mo_qkv_{}", suffix(y.dtype())?);
    let threads = 128;
    let cfg = super::grid(
        rows(n),
        threads,
        smem(g.sum_r as usize + (threads as usize / 32) * 2 * spec.head_dim),
    );
    launch_kernel_cfg!(dev, &name, cfg, &py, &pb, &pu, &pc, &ps, &pp, &pq, &pk, &pg, &po, &p, &g)?;
    Ok(out)
}

// ---- SwiGLU ----------------------------------------------------------------------------------

pub(crate) fn swiglu(
    dev: &CudaDevice,
    gu: &GateUp,
    backward: Option<(&Tensor, Option<GroupRef>)>,
    n: usize,
    i: usize,
) -> Result<CudaStorage> {
    let mut ptrs = Ptrs::new();
    let py = ptrs.of(gu.y)?;
    let (pu, g) = match gu.lora {
        Some((u, ads)) => (ptrs.of(u)?, group(&mut ptrs, ads, None, 2 * i)?),
        None => (0, MoGroup::default()),
    };
    let (pdh, pdd, down) = match backward {
        Some((dh, Some((du, ads)))) => {
            (ptrs.of(dh)?, ptrs.of(du)?, group(&mut ptrs, ads, None, 0)?)
        }
        Some((dh, None)) => (ptrs.of(dh)?, 0, MoGroup::default()),
        None => (0, 0, MoGroup::default()),
    };
    let width = if backward.is_some() { 2 * i } else { i };
    let out = alloc(dev, gu.y.dtype(), n * width)?;
    let po = address(&out, 0)?;
    let name = format!("mo_swiglu_{}", suffix(gu.y.dtype())?);
    let i32_ = i as i32;
    let cfg = super::grid(rows(n), 256, smem((g.sum_r + down.sum_r) as usize));
    launch_kernel_cfg!(dev, &name, cfg, &py, &pu, &pdh, &pdd, &po, &i32_, &g, &down)?;
    Ok(out)
}

// ---- attention ----------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy)]
struct MoAttn {
    batch: i32,
    heads: i32,
    kv_heads: i32,
    seq: i32,
    keys: i32,
    past: i32,
}

const ATTN_THREADS: usize = 128;

fn attn_params(spec: &AttnSpec) -> Result<(MoAttn, usize)> {
    let (b, nh, t, d) = spec.q.dims4()?;
    let (_, nkv, tk, _) = spec.k.dims4()?;
    if ![16, 32, 64, 128].contains(&d) {
        candle_core::bail!("mo-align CUDA attention: head_dim {d} (kernels for 16, 32, 64, 128)");
    }
    Ok((
        MoAttn {
            batch: b as i32,
            heads: nh as i32,
            kv_heads: nkv as i32,
            seq: t as i32,
            keys: tk as i32,
            past: spec.past as i32,
        },
        d,
    ))
}

fn attn_grid(
    rows_total: usize,
    d: usize,
    heads: usize,
    batch: usize,
) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    let tpr = if d >= 32 { d / 32 } else { 1 };
    let rows_per_block = ATTN_THREADS / tpr;
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (
            rows_total.div_ceil(rows_per_block) as u32,
            heads as u32,
            batch as u32,
        ),
        block_dim: (ATTN_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// (o [B, T, nh * d], lse [B, nh, T] f32): lse lives in its own f32 tensor on the GPU.
pub(crate) fn attention_forward_pair(spec: AttnSpec) -> Result<(Tensor, Tensor)> {
    let (p, d) = attn_params(&spec)?;
    let (b, nh, t) = (p.batch as usize, p.heads as usize, p.seq as usize);
    let lse = super::uninit((b, nh, t), DType::F32, spec.q)?;
    let o = super::produce(&AttnForward { spec, lse: &lse, d }, spec.q)?.reshape((b, t, nh * d))?;
    Ok((o, lse))
}

struct AttnForward<'a> {
    spec: AttnSpec<'a>,
    lse: &'a Tensor,
    d: usize,
}

impl super::Produce for AttnForward<'_> {
    fn name(&self) -> &'static str {
        "mo-attention"
    }
    fn output(&self) -> (candle_core::Shape, DType) {
        (
            candle_core::Shape::from(self.spec.q.elem_count()),
            self.spec.q.dtype(),
        )
    }
    fn bytes(&self) -> u64 {
        let s = &self.spec;
        super::nbytes(
            2 * s.q.elem_count() + s.k.elem_count() + s.v.elem_count(),
            s.q.dtype(),
        )
    }
    fn cpu(&self) -> Result<candle_core::CpuStorage> {
        candle_core::bail!("mo-align: the GPU attention ran on the CPU")
    }
    fn cuda(&self, dev: &CudaDevice) -> Result<CudaStorage> {
        let s = &self.spec;
        let (p, d) = attn_params(s)?;
        let mut ptrs = Ptrs::new();
        let (pq, pk, pv, ps) = (
            ptrs.of(s.q)?,
            ptrs.of(s.k)?,
            ptrs.of(s.v)?,
            ptrs.of(s.spans)?,
        );
        let pl = ptrs.of(self.lse)?;
        let out = alloc(dev, s.q.dtype(), s.q.elem_count())?;
        let po = address(&out, 0)?;
        let name = format!("mo_attn_fwd_{}_d{}", suffix(s.q.dtype())?, d);
        let cfg = attn_grid(p.seq as usize, d, p.heads as usize, p.batch as usize);
        debug_assert_eq!(d, self.d);
        launch_kernel_cfg!(dev, &name, cfg, &pq, &pk, &pv, &ps, &po, &pl, &p)?;
        Ok(out)
    }
}

pub(crate) fn attention_forward(_dev: &CudaDevice, _spec: &AttnSpec) -> Result<CudaStorage> {
    candle_core::bail!("mo-align: the GPU attention goes through attention_forward_pair")
}

pub(crate) fn attention_backward(
    dev: &CudaDevice,
    spec: &AttnSpec,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    lora: Option<(&Tensor, &[Adapter])>,
) -> Result<CudaStorage> {
    let (p, d) = attn_params(spec)?;
    let (b, nh, nkv, t, tk) = (
        p.batch as usize,
        p.heads as usize,
        p.kv_heads as usize,
        p.seq as usize,
        p.keys as usize,
    );
    let dtype = spec.q.dtype();
    let sfx = suffix(dtype)?;
    let mut ptrs = Ptrs::new();
    let (pq, pk, pv, ps) = (
        ptrs.of(spec.q)?,
        ptrs.of(spec.k)?,
        ptrs.of(spec.v)?,
        ptrs.of(spec.spans)?,
    );
    let (po, pl, pd) = (ptrs.of(o)?, ptrs.of(lse)?, ptrs.of(dout)?);
    let (pdu, g) = match lora {
        Some((du, ads)) => (ptrs.of(du)?, group(&mut ptrs, ads, None, 0)?),
        None => (0, MoGroup::default()),
    };
    // Scratch: dO with the adapters' part, and delta = rowsum(dO * O).
    let dtot = alloc(dev, dtype, b * t * nh * d)?;
    let delta = alloc(dev, DType::F32, b * nh * t)?;
    let (pt, pdl) = (address(&dtot, 0)?, address(&delta, 0)?);
    let d32 = d as i32;
    let cfg = super::grid(rows(b * t), 256, smem(g.sum_r as usize + nh * d));
    launch_kernel_cfg!(
        dev,
        &format!("mo_attn_bwd_prep_{sfx}"),
        cfg,
        &pd,
        &po,
        &pdu,
        &pt,
        &pdl,
        &p,
        &d32,
        &g
    )?;
    let (nq, nk) = (b * nh * t * d, b * nkv * tk * d);
    let out = alloc(dev, dtype, nq + 2 * nk)?;
    let esz = dtype.size_in_bytes() as u64;
    let pdq = address(&out, 0)?;
    let (pdk, pdv) = (pdq + nq as u64 * esz, pdq + (nq + nk) as u64 * esz);
    let cfg = attn_grid(t, d, nh, b);
    launch_kernel_cfg!(
        dev,
        &format!("mo_attn_bwd_dq_{sfx}_d{d}"),
        cfg,
        &pq,
        &pk,
        &pv,
        &ps,
        &pt,
        &pl,
        &pdl,
        &pdq,
        &p
    )?;
    let cfg = attn_grid(tk, d, nkv, b);
    launch_kernel_cfg!(
        dev,
        &format!("mo_attn_bwd_dkdv_{sfx}_d{d}"),
        cfg,
        &pq,
        &pk,
        &pv,
        &ps,
        &pt,
        &pl,
        &pdl,
        &pdk,
        &pdv,
        &p
    )?;
    // Three launches in one op: the prep and the two gradient kernels.
    crate::util::profile::tally_op("mo-attention-backward", 2, 0);
    Ok(out)
}

// ---- cuBLAS --------------------------------------------------------------------------------

fn cuda_type(dtype: DType) -> Result<cublas::cudaDataType> {
    Ok(match dtype {
        DType::F32 => cublas::cudaDataType::CUDA_R_32F,
        DType::BF16 => cublas::cudaDataType::CUDA_R_16BF,
        DType::F16 => cublas::cudaDataType::CUDA_R_16F,
        DType::F64 => cublas::cudaDataType::CUDA_R_64F,
        other => candle_core::bail!("mo-align gemm: no cuBLAS type for {other:?}"),
    })
}

/// One operand as cuBLAS (column-major) sees it: transposition and leading dimension.
fn operand(v: &MatView, what: &str) -> Result<(cublas::cublasOperation_t, i32)> {
    use cublas::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    // A row-major [rows, cols] view (column stride 1) is, column-major, its transpose with
    // leading dimension = the row stride; a column-major one (row stride 1) is itself.
    if v.cs == 1 || v.cols == 1 {
        Ok((CUBLAS_OP_N, v.rs.max(v.cols).max(1) as i32))
    } else if v.rs == 1 || v.rows == 1 {
        Ok((CUBLAS_OP_T, v.cs.max(v.rows).max(1) as i32))
    } else {
        candle_core::bail!("mo-align gemm: {what} {v:?} has no unit stride (cuBLAS needs one)")
    }
}

/// `dst (+)= alpha a @ b` with raw addresses (row-major dst with unit column stride), as the
/// column-major product dst^T = b^T a^T.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_raw(
    dev: &CudaDevice,
    dst: (u64, DType, &MatView),
    a: (u64, DType, &MatView),
    b: (u64, DType, &MatView),
    alpha: f64,
    accumulate: bool,
) -> Result<()> {
    let (d, av, bv) = (dst.2, a.2, b.2);
    if d.cs != 1 && d.cols != 1 {
        candle_core::bail!("mo-align gemm: the destination {d:?} must have unit column stride");
    }
    let (m, n, k) = (d.rows, d.cols, av.cols);
    let (op_b, ldb) = operand(bv, "rhs")?;
    let (op_a, lda) = operand(av, "lhs")?;
    let ldc = d.rs.max(d.cols).max(1) as i32;
    let blas = dev.cublas_handle();
    let (alpha64, beta64) = (alpha, if accumulate { 1.0f64 } else { 0.0f64 });
    let (alpha, beta) = (alpha64 as f32, beta64 as f32);
    let f64_ = dst.1 == DType::F64;
    let (pa, pb) = if f64_ {
        (
            &alpha64 as *const f64 as *const _,
            &beta64 as *const f64 as *const _,
        )
    } else {
        (
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
        )
    };
    let compute = if f64_ {
        cublas::cublasComputeType_t::CUBLAS_COMPUTE_64F
    } else {
        cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let batch = d.batch;
    // SAFETY: the addresses are live device buffers holding the views described.
    let status = unsafe {
        cublas::cublasGemmStridedBatchedEx(
            *blas.handle(),
            op_b,
            op_a,
            n as i32,
            m as i32,
            k as i32,
            pa,
            b.0 as *const _,
            cuda_type(b.1)?,
            ldb,
            if bv.batch == 1 { 0 } else { bv.bs as i64 },
            a.0 as *const _,
            cuda_type(a.1)?,
            lda,
            if av.batch == 1 { 0 } else { av.bs as i64 },
            pb,
            dst.0 as *mut _,
            cuda_type(dst.1)?,
            ldc,
            d.bs as i64,
            batch as i32,
            compute,
            cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    };
    if status != cublas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        candle_core::bail!("mo-align gemm: cuBLAS failed with {status:?}");
    }
    Ok(())
}

/// `gemm::mm*` on CUDA: dst a storage (offset in elements) with view `d`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    dev: &CudaDevice,
    dst: &mut CudaStorage,
    offset: usize,
    d: &MatView,
    a: &Held,
    av: &MatView,
    b: &Held,
    bv: &MatView,
    alpha: f64,
    accumulate: bool,
) -> Result<()> {
    let dd = dst.dtype();
    gemm_raw(
        dev,
        (address(dst, offset)?, dd, d),
        (held_address(a)?, a.dtype(), av),
        (held_address(b)?, b.dtype(), bv),
        alpha,
        accumulate,
    )
}

// ---- the LM head ----------------------------------------------------------------------------

/// One chunk of the fused cross entropy into `dst` [C, H + 1] (f32): GEMM to f32 logits, the
/// row kernel, and (with `grad`) the GEMM of (softmax - onehot) with the weight.
pub(crate) fn cross_entropy(
    dst: &mut CudaStorage,
    l: &Layout,
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    grad: bool,
) -> Result<()> {
    let dev = dst.device.clone();
    let (c, hdim) = h.dims2()?;
    let v = w.dims()[0];
    let dtype = h.dtype();
    let (hh, hw, ht) = (hold(h), hold(w), hold(targets));
    let logits = alloc(&dev, DType::F32, c * v)?;
    let pl = address(&logits, 0)?;
    let lv = MatView {
        batch: 1,
        rows: c,
        cols: v,
        bs: 0,
        rs: v,
        cs: 1,
    };
    let hv = MatView {
        batch: 1,
        rows: c,
        cols: hdim,
        bs: 0,
        rs: hdim,
        cs: 1,
    };
    let wt = MatView {
        batch: 1,
        rows: hdim,
        cols: v,
        bs: 0,
        rs: 1,
        cs: hdim,
    };
    let (ph, pw) = (held_address(&hh)?, held_address(&hw)?);
    gemm_raw(
        &dev,
        (pl, DType::F32, &lv),
        (ph, dtype, &hv),
        (pw, w.dtype(), &wt),
        1.0,
        false,
    )?;
    let probs = alloc(&dev, w.dtype(), if grad { c * v } else { 1 })?;
    let pp = address(&probs, 0)?;
    let stride = l.stride()[0] as i64;
    let pout = address(dst, l.start_offset())?;
    let pt = held_address(&ht)?;
    let (h32, v32, g32) = (hdim as i32, v as i32, grad as i32);
    let name = format!("mo_xent_row_{}", suffix(w.dtype())?);
    launch_kernel_cfg!(
        dev,
        &name,
        super::grid(c as u32, 256, 0),
        &pl,
        &pt,
        &pout,
        &stride,
        &h32,
        &pp,
        &v32,
        &g32
    )?;
    let mut launches = 2;
    if grad {
        let pv = MatView {
            batch: 1,
            rows: c,
            cols: v,
            bs: 0,
            rs: v,
            cs: 1,
        };
        let ev = MatView {
            batch: 1,
            rows: v,
            cols: hdim,
            bs: 0,
            rs: hdim,
            cs: 1,
        };
        let gv = MatView {
            batch: 1,
            rows: c,
            cols: hdim,
            bs: 0,
            rs: stride as usize,
            cs: 1,
        };
        gemm_raw(
            &dev,
            (pout, DType::F32, &gv),
            (pp, w.dtype(), &pv),
            (pw, w.dtype(), &ev),
            -1.0,
            false,
        )?;
        launches += 1;
    }
    crate::util::profile::tally_op("mo-cross-entropy", launches - 1, 0);
    Ok(())
}

/// Turns off cudarc's per-allocation event tracking on the device's context: candle runs one
/// stream, where the events (two per allocation, recorded at every launch) only cost host time.
/// `MO_ALIGN_CUDA_EVENT_TRACKING=1` keeps them (for an A/B).
pub fn tune_device(dev: &candle_core::Device) {
    static KEEP: crate::util::switch::EnvSwitch =
        crate::util::switch::EnvSwitch::new("MO_ALIGN_CUDA_EVENT_TRACKING");
    if let candle_core::Device::Cuda(d) = dev {
        if !KEEP.get(false) {
            // SAFETY: candle issues all work on the device's one stream, so no cross-stream
            // synchronisation is needed; buffers allocated before this call keep their events.
            unsafe { d.cuda_stream().context().disable_event_tracking() };
        }
    }
}
