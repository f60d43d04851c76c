//! Micro-benchmarks for the pieces on the hot path: decoders, the output
//! queue and the timer heap.
//!
//! Run: `cargo bench --bench codecs` (under `cargo test` each runs once).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use muxserve::buffer::OutBuf;
use muxserve::codec::{decode_all, Delimited, Encoder, LengthPrefixed};

fn lines(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for len in [16usize, 256, 4096] {
        let mut wire = Vec::new();
        let line = vec![b'x'; len];
        let mut enc = Delimited::lines(64 * 1024);
        while wire.len() < 256 * 1024 {
            enc.encode(&line, &mut wire).unwrap();
        }
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new("lines", len), &wire, |b, wire| {
            b.iter(|| decode_all(&mut Delimited::lines(64 * 1024), black_box(wire)).unwrap())
        });
        let mut wire = Vec::new();
        let mut enc = LengthPrefixed::new(4, 1024 * 1024);
        while wire.len() < 256 * 1024 {
            enc.encode(&line, &mut wire).unwrap();
        }
        group.bench_with_input(
            BenchmarkId::new("length_prefixed", len),
            &wire,
            |b, wire| {
                b.iter(|| {
                    decode_all(&mut LengthPrefixed::new(4, 1024 * 1024), black_box(wire)).unwrap()
                })
            },
        );
    }
    group.finish();
}

fn outbuf(c: &mut Criterion) {
    let chunk = [7u8; 1500];
    c.bench_function("outbuf/extend_advance_1500B", |b| {
        let mut out = OutBuf::new();
        b.iter(|| {
            out.extend(black_box(&chunk));
            out.advance(1000);
            if out.len() > 64 * 1024 {
                out.advance(out.len());
            }
        })
    });
}

fn timers(c: &mut Criterion) {
    // The heap is crate-private; measure it through the public Harness,
    // which arms one timer per call, like a service would.
    use muxserve::testing::Harness;
    use muxserve::{Context, Input, Service};
    struct Arm;
    impl Service for Arm {
        type Session = ();
        fn on_connect(&mut self, cx: &mut Context<'_>) {
            cx.set_timer(Duration::from_secs(60));
        }
        fn on_data(&mut self, _: &mut Context<'_>, _: &mut (), _: &mut Input<'_>) {}
    }
    c.bench_function("timers/arm_10000_then_expire", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut h = Harness::new(Arm);
                let start = Instant::now();
                for _ in 0..10_000 {
                    h.connect();
                }
                h.advance(Duration::from_secs(61));
                total += start.elapsed();
            }
            total
        })
    });
}

criterion_group!(benches, lines, outbuf, timers);
criterion_main!(benches);
