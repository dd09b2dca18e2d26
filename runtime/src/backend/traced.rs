//! A backend that delegates every op to [`Cpu`] and counts the calls: proof that the decoder
//! computes only through the [`Backend`] interface (a non-default backend gives the CPU's logits
//! bit for bit, and every op the model needs is reached), and the template of a per-op parity
//! harness for other backends.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use super::cpu::{KvCache, LinearState};
use super::{
    AttnShape, Backend, Cpu, DeltaNetParams, Glu, HeadBlocks, KvElem, RouterRule, Routing,
};
use crate::config::Rope;
use crate::error::Result;
use crate::weights::TensorRef;

/// [`Cpu`] with a call counter per op.
#[derive(Default)]
pub struct Traced {
    cpu: Cpu,
    calls: Mutex<BTreeMap<&'static str, usize>>,
}

impl Traced {
    fn hit(&self, op: &'static str) {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
    }

    pub fn calls(&self) -> BTreeMap<&'static str, usize> {
        self.calls.lock().unwrap().clone()
    }
}

impl Backend for Traced {
    type Weight = TensorRef;
    type Vector = Vec<f32>;
    type Act = Vec<f32>;
    type Kv = KvCache;
    type Recurrent = LinearState;

    fn name(&self) -> &'static str {
        "traced-cpu"
    }
    fn upload_weight(&self, t: TensorRef) -> Result<TensorRef> {
        self.hit("upload_weight");
        self.cpu.upload_weight(t)
    }
    fn upload_vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        self.hit("upload_vector");
        self.cpu.upload_vector(v)
    }
    fn act_from_host(&self, v: Vec<f32>) -> Vec<f32> {
        self.hit("act_from_host");
        v
    }
    fn to_host<'a>(&self, x: &'a Vec<f32>) -> Cow<'a, [f32]> {
        self.hit("to_host");
        Cow::Borrowed(x)
    }
    fn embed(&self, t: &TensorRef, ids: &[u32], width: usize) -> Vec<f32> {
        self.hit("embed");
        self.cpu.embed(t, ids, width)
    }
    fn matmul(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &TensorRef,
        n_in: usize,
        n_out: usize,
        bias: Option<&Vec<f32>>,
    ) -> Vec<f32> {
        self.hit("matmul");
        self.cpu.matmul(x, rows, w, n_in, n_out, bias)
    }
    fn rms_norm(&self, x: &mut Vec<f32>, w: &Vec<f32>, width: usize, eps: f32) {
        self.hit("rms_norm");
        self.cpu.rms_norm(x, w, width, eps)
    }
    fn copy(&self, x: &Vec<f32>) -> Vec<f32> {
        self.hit("copy");
        x.clone()
    }
    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) {
        self.hit("add");
        self.cpu.add(x, y)
    }
    fn take_rows(&self, x: &Vec<f32>, width: usize, ranges: &[Range<usize>]) -> Vec<f32> {
        self.hit("take_rows");
        self.cpu.take_rows(x, width, ranges)
    }
    fn split_halves(&self, x: &Vec<f32>, d: usize) -> (Vec<f32>, Vec<f32>) {
        self.hit("split_halves");
        self.cpu.split_halves(x, d)
    }
    fn split_heads(&self, x: &Vec<f32>, a: usize, b: usize) -> (Vec<f32>, Vec<f32>) {
        self.hit("split_heads");
        self.cpu.split_heads(x, a, b)
    }
    fn join_heads(&self, x: &Vec<f32>, y: &Vec<f32>, a: usize, b: usize) -> Vec<f32> {
        self.hit("join_heads");
        self.cpu.join_heads(x, y, a, b)
    }
    fn head_matmul(
        &self,
        x: &Vec<f32>,
        rows: usize,
        w: &TensorRef,
        blocks: &HeadBlocks,
        transposed: bool,
    ) -> Vec<f32> {
        self.hit("head_matmul");
        self.cpu.head_matmul(x, rows, w, blocks, transposed)
    }
    fn clamp(&self, x: &mut Vec<f32>, limit: f32) {
        self.hit("clamp");
        self.cpu.clamp(x, limit)
    }
    fn rope(
        &self,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        head_dim: usize,
        positions: &[usize],
        rope: &Rope,
    ) {
        self.hit("rope");
        self.cpu.rope(q, k, head_dim, positions, rope)
    }
    fn mul_sigmoid(&self, x: &mut Vec<f32>, gate: &Vec<f32>) {
        self.hit("mul_sigmoid");
        self.cpu.mul_sigmoid(x, gate)
    }
    fn glu(&self, gate: &Vec<f32>, up: &mut Vec<f32>, kind: Glu) {
        self.hit("glu");
        self.cpu.glu(gate, up, kind)
    }
    fn add_gated_rows(&self, out: &mut Vec<f32>, y: &Vec<f32>, gate: &Vec<f32>, width: usize) {
        self.hit("add_gated_rows");
        self.cpu.add_gated_rows(out, y, gate, width)
    }
    fn route(&self, logits: Vec<f32>, rule: &RouterRule, bias: Option<&Vec<f32>>) -> Routing {
        self.hit("route");
        self.cpu.route(logits, rule, bias)
    }
    fn kv_new(&self, elem: KvElem) -> KvCache {
        self.hit("kv_new");
        self.cpu.kv_new(elem)
    }
    fn kv_len(&self, kv: &KvCache) -> usize {
        self.cpu.kv_len(kv)
    }
    fn kv_truncate(&self, kv: &mut KvCache, len: usize, row: usize) {
        self.hit("kv_truncate");
        self.cpu.kv_truncate(kv, len, row)
    }
    fn kv_bytes(&self, kv: &KvCache) -> usize {
        self.cpu.kv_bytes(kv)
    }
    fn attend(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: Option<&Vec<f32>>,
        lens: &[usize],
        caches: &mut [&mut KvCache],
        shape: &AttnShape,
        sinks: Option<&Vec<f32>>,
    ) -> Vec<f32> {
        self.hit("attend");
        self.cpu.attend(q, k, v, lens, caches, shape, sinks)
    }
    fn recurrent_new(&self, conv: usize, ssm: usize) -> LinearState {
        self.hit("recurrent_new");
        self.cpu.recurrent_new(conv, ssm)
    }
    fn recurrent_bytes(&self, st: &LinearState) -> usize {
        self.cpu.recurrent_bytes(st)
    }
    fn delta_net(
        &self,
        qkvz: &Vec<f32>,
        ba: &Vec<f32>,
        p: &DeltaNetParams<'_, Traced>,
        lens: &[usize],
        states: &mut [&mut LinearState],
    ) -> Vec<f32> {
        self.hit("delta_net");
        let p = DeltaNetParams::<'_, Cpu> {
            dims: p.dims,
            conv_weight: p.conv_weight,
            neg_a: p.neg_a,
            dt_bias: p.dt_bias,
            norm: p.norm,
            norm_eps: p.norm_eps,
        };
        self.cpu.delta_net(qkvz, ba, &p, lens, states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Decoder, Logits};
    use crate::open::{open, Purpose, Settings};
    use crate::store::{TieredStore, TieredStoreConfig};

    /// The demo model's decoder on backend `b` (an unbounded store of mapped experts).
    fn demo_on<B: Backend>(b: B) -> Decoder<B> {
        let s = Settings {
            cache: false,
            ..Settings::default()
        };
        let mut o = open(&s, Purpose::Load).unwrap();
        let experts = std::mem::take(&mut o.skeleton.experts);
        let store = TieredStore::new(
            experts,
            o.config.hidden_size,
            o.config.moe_intermediate_size,
            TieredStoreConfig::default(),
        )
        .unwrap();
        Decoder {
            hidden_size: o.config.hidden_size,
            vocab_size: o.config.vocab_size,
            store: Box::new(store),
            w: o.skeleton.upload(&b).unwrap(),
            backend: b,
            kv_elem: KvElem::F32,
        }
    }

    #[test]
    fn a_delegating_backend_gives_the_cpu_logits_bit_for_bit_and_reaches_every_op() {
        let cpu = demo_on(Cpu::default());
        let traced = demo_on(Traced::default());
        let prompt = [1u32, 5, 9, 2, 7, 3];
        let (mut sc, mut st) = (cpu.new_state(), traced.new_state());
        let a = cpu.forward(&prompt, &mut sc, Logits::All, None).unwrap();
        let b = traced.forward(&prompt, &mut st, Logits::All, None).unwrap();
        assert_eq!(a, b, "prefill logits differ");
        for id in [4u32, 8] {
            let a = cpu.forward(&[id], &mut sc, Logits::Last, None).unwrap();
            let b = traced.forward(&[id], &mut st, Logits::Last, None).unwrap();
            assert_eq!(a, b, "decode logits differ");
        }
        let calls = traced.backend.calls();
        for op in [
            "upload_weight",
            "upload_vector",
            "embed",
            "matmul",
            "rms_norm",
            "add",
            "take_rows",
            "rope",
            "route",
            "attend",
            "kv_new",
            "to_host",
            "act_from_host",
        ] {
            assert!(
                calls.get(op).copied().unwrap_or(0) > 0,
                "{op} never called: {calls:?}"
            );
        }
        // One embedding and one head per forward call.
        assert_eq!(calls["embed"], 3);
        assert_eq!(calls["take_rows"], 3);
    }
}
