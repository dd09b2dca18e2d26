//! Cache-blocked GEMM driver shared by the SIMD levels (used when m > `MATVEC_MAX_M`).
//!
//! Weights are widened to f32 and packed into panels of `NR` weight rows laid out k-major
//! (`panel[p * NR + c] = w[j0 + c][pc + p]`), so the micro-kernel loads `NR` consecutive output
//! columns per k step and broadcasts one x element per row: an `MR × NR` register tile of
//! accumulators, no horizontal sums, and each packed tile reused by every row strip of x.
//!
//! Summation order: every output element is one running f32 FMA chain over `p = 0..k` in
//! increasing order (the chain is stored to `out` between k blocks and reloaded, which is exact),
//! so the result is independent of the tiling, the chunking and the thread count.

use crate::avx2::{self, Load8};
use crate::OutBlock;

/// K depth of one packed block: a 256-deep panel of 32 f32 columns is 32 KiB, so the panel the
/// micro-kernel streams stays in L1 together with the x strip it multiplies.
pub(crate) const KC: usize = 256;

/// Weight rows packed at once: 256 × `KC` × 4 B = 256 KiB, resident in L2 while every row strip
/// of x sweeps over it.
pub(crate) const NC: usize = 256;

/// One micro-kernel call: `out[i0.., j0..][rows, cols] (+)= x_strip · panelᵀ` over `kc` steps.
pub(crate) struct Tile<'a> {
    /// x from row `i0`, column `pc`: row `r`'s k-block is `x[r * ldx ..][..kc]`.
    pub x: &'a [f32],
    pub ldx: usize,
    /// Rows in this tile, `1..=MR`.
    pub rows: usize,
    pub i0: usize,
    /// Packed weights, `kc × NR`, zero in columns `cols..NR`.
    pub panel: &'a [f32],
    pub kc: usize,
    pub j0: usize,
    /// Valid output columns, `1..=NR`.
    pub cols: usize,
    /// First k block: start the chains at zero instead of reloading them from `out`.
    pub first: bool,
}

impl Tile<'_> {
    /// Panics unless every access the micro-kernel makes through this tile is in bounds.
    #[inline]
    pub(crate) fn check<M: Micro>(&self, out: &OutBlock) {
        assert!(self.rows >= 1 && self.rows <= M::MR);
        assert!(self.cols >= 1 && self.cols <= M::NR);
        assert!(self.kc >= 1);
        assert!(self.x.len() >= (self.rows - 1) * self.ldx + self.kc);
        assert!(self.panel.len() >= self.kc * M::NR);
        assert!(self.i0 + self.rows <= out.rows());
        assert!(self.j0 + self.cols <= out.cols());
    }
}

/// A level's register-tile kernel.
pub(crate) trait Micro {
    /// Rows of x per tile.
    const MR: usize;
    /// Output columns per tile (packed panel width).
    const NR: usize;
    /// Runs one tile (it calls `tile.check` itself).
    ///
    /// # Safety
    /// The CPU must support the kernel's SIMD level.
    unsafe fn run(tile: &Tile, out: &mut OutBlock);
}

/// `out[rows, cols] = x[rows, k] · w[cols, k]ᵀ` with micro-kernel `M`; `k > 0`.
///
/// # Safety
/// The CPU must support `M`'s SIMD level and AVX2 + FMA + F16C (the packing step).
pub(crate) unsafe fn gemm<T: Load8, M: Micro>(x: &[f32], k: usize, w: &[T], out: &mut OutBlock) {
    let (m, nc) = (out.rows(), out.cols());
    assert!(k > 0);
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), nc * k);
    let mut pack = vec![0f32; KC.min(k) * NC.min(nc).next_multiple_of(M::NR)];
    for jc in (0..nc).step_by(NC) {
        let ncb = NC.min(nc - jc);
        let wb = &w[jc * k..(jc + ncb) * k];
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let pack = &mut pack[..ncb.div_ceil(M::NR) * kc * M::NR];
            // SAFETY: the caller guarantees AVX2 + FMA + F16C.
            unsafe { avx2::pack_panels(wb, k, pc, kc, M::NR, pack) };
            for i0 in (0..m).step_by(M::MR) {
                let rows = M::MR.min(m - i0);
                let xs = &x[i0 * k + pc..(i0 + rows - 1) * k + pc + kc];
                for (jp, panel) in pack.chunks_exact(kc * M::NR).enumerate() {
                    let tile = Tile {
                        x: xs,
                        ldx: k,
                        rows,
                        i0,
                        panel,
                        kc,
                        j0: jc + jp * M::NR,
                        cols: M::NR.min(ncb - jp * M::NR),
                        first: pc == 0,
                    };
                    // SAFETY: the caller guarantees the CPU supports M's level.
                    unsafe { M::run(&tile, out) };
                }
            }
        }
    }
}
