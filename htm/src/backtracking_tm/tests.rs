use super::slots::NO_SEGMENT;
use super::*;

/// `count` pairwise-disjoint random SDRs of `w` columns, plus the columns none of them use.
fn disjoint_sdrs(seed: u64, columns: u32, count: usize, w: usize) -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut rng = Random::new(seed);
    let mut all: Vec<u32> = (0..columns).collect();
    rng.shuffle(&mut all);
    let mut sdrs: Vec<Vec<u32>> = all.chunks(w).take(count).map(|c| c.to_vec()).collect();
    for s in &mut sdrs {
        s.sort_unstable();
    }
    let mut unused = all[count * w..].to_vec();
    unused.sort_unstable();
    (sdrs, unused)
}

fn overlap(a: &[u32], b: &[u32]) -> usize {
    crate::sdr::sorted_intersection_len(a, b)
}

/// A scalar stream shaped like NAB data (daily-ish cycle, drifting noise, a few level shifts)
/// mapped to ~40 of 2048 columns so that close values share columns, as encoder + SP do.
fn nab_like_stream(len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Random::new(seed);
    let positions = 400u32;
    let mut position_to_column: Vec<u32> = (0..2048).collect();
    rng.shuffle(&mut position_to_column);
    let mut drift = 0.0f64;
    (0..len)
        .map(|t| {
            drift = (drift + (rng.real() - 0.5) * 0.6).clamp(-8.0, 8.0);
            let mut v = 50.0 + 30.0 * (t as f64 * std::f64::consts::TAU / 96.0).sin() + drift;
            if (t % 1500) > 1400 && (t % 1500) < 1420 {
                v = 150.0; // an anomalous excursion to values never seen
            }
            let bucket = (v.clamp(0.0, 179.0) as u32) * 2;
            let mut cols: Vec<u32> = (bucket..bucket + 40)
                .map(|p| position_to_column[(p % positions) as usize])
                .collect();
            cols.sort_unstable();
            cols.dedup();
            cols
        })
        .collect()
}

/// Checks the derived structures against the segments: the out index lists every synapse
/// once with its connected flag and each synapse knows its entry, slot lists and segment
/// metadata agree, start cells have no segments, synapses are sorted and within the cap, and
/// the segment and synapse counts add up.
fn check_invariants(tm: &BacktrackingTm) {
    let p = tm.params();
    let mut expected: Vec<(u32, bool, u32)> = Vec::new();
    let mut live = 0;
    let mut synapses = 0;
    for cell in 0..p.num_cells() as u32 {
        let slots = tm.cell_slots.slots(cell);
        assert_eq!(slots.len(), tm.segment_slots_on_cell(cell));
        if p.max_segments_per_cell > 0 {
            assert!(slots.len() <= p.max_segments_per_cell as usize);
        }
        let mut free = tm.cell_slots.free_slots(cell).to_vec();
        free.sort_unstable();
        let empty: Vec<u32> = (0..slots.len() as u32)
            .filter(|&i| slots[i as usize] == NO_SEGMENT)
            .collect();
        assert_eq!(free, empty, "free slots of cell {cell}");
        for (slot, &seg) in slots.iter().enumerate() {
            if seg == NO_SEGMENT {
                continue;
            }
            live += 1;
            assert!(p.cells_per_column == 1 || cell % p.cells_per_column != 0);
            let meta = &tm.segments[seg as usize];
            assert!(meta.alive());
            assert_eq!((meta.cell(), meta.slot()), (cell, slot as u32));
            let syns = tm.segment_synapses(seg);
            assert!(!syns.is_empty());
            synapses += syns.len();
            if p.max_synapses_per_segment > 0 {
                assert!(syns.len() <= p.max_synapses_per_segment as usize);
            }
            assert!(
                syns.windows(2).all(|w| w[0].presyn() < w[1].presyn()),
                "synapses sorted by distinct presynaptic cells"
            );
            for syn in syns {
                let perm = tm.permanence(&syn);
                assert!(perm > 0.0 && perm <= p.permanence_max);
                let connected = perm >= p.connected_perm;
                expected.push((syn.presyn(), connected, seg));
            }
        }
    }
    assert_eq!(live, tm.num_segments());
    assert_eq!(synapses, tm.num_synapses());
    assert!(!tm.segments[SINK as usize].alive() && tm.synapses.get(SINK as usize).is_empty());
    for (seg, meta) in tm.segments.iter().enumerate().skip(1) {
        if !meta.alive() {
            assert!(tm.synapses.get(seg).is_empty());
            assert!(tm.free_segments.contains(&(seg as u32)));
        }
    }
    let mut indexed: Vec<(u32, bool, u32)> = (0..p.num_cells() as u32)
        .flat_map(|cell| {
            let [connected, other] = tm.out_index.lists(cell);
            let c = connected.into_iter().map(move |seg| (cell, true, seg));
            c.chain(other.into_iter().map(move |seg| (cell, false, seg)))
        })
        .collect();
    expected.sort_unstable();
    indexed.sort_unstable();
    assert_eq!(indexed, expected, "out index out of step with the segments");
}

/// Sets the permanence of `seg`'s synapse from `presyn` to `perm` (a value the parameters'
/// steps reach), keeping the out index in step.
fn set_perm(tm: &mut BacktrackingTm, seg: SegmentId, presyn: u32, perm: f32) {
    let k = tm
        .segment_synapses(seg)
        .iter()
        .position(|s| s.presyn() == presyn)
        .expect("synapse on segment");
    let code = (1..DROPPED)
        .find(|&c| (tm.codec.value(c) - perm).abs() < 1e-6)
        .expect("a reachable permanence");
    tm.set_code(seg, k, code);
}

/// All live segments with their synapses, for comparing learned state.
fn all_synapses(tm: &BacktrackingTm) -> Vec<(u32, Vec<Synapse>)> {
    (0..tm.params().num_cells() as u32)
        .flat_map(|cell| tm.segments_on_cell(cell).collect::<Vec<_>>())
        .map(|seg| {
            (
                tm.segments[seg as usize].cell(),
                tm.segment_synapses(seg).to_vec(),
            )
        })
        .collect()
}

fn tm(params: BacktrackingTmParams) -> BacktrackingTm {
    BacktrackingTm::new(params).expect("valid params")
}

#[test]
fn defaults_are_nab_settings_and_valid() {
    let p = BacktrackingTmParams::default();
    assert!(p.validate().is_ok());
    assert_eq!((p.column_count, p.cells_per_column), (2048, 32));
    assert_eq!((p.min_threshold, p.activation_threshold), (10, 13));
    assert_eq!(
        (p.max_segments_per_cell, p.max_synapses_per_segment),
        (128, 32)
    );
    assert_eq!((p.initial_perm, p.connected_perm), (0.21, 0.5));
    assert_eq!(
        (p.pam_length, p.seed, p.output_type),
        (3, 1960, OutputType::Normal)
    );
    assert_eq!(
        p.max_segments, 8192,
        "bounded by default; 0 is NuPIC's unbounded TM"
    );
}

#[test]
fn invalid_params_are_rejected_with_the_parameter_named() {
    let cases: Vec<(&str, BacktrackingTmParams)> = vec![
        (
            "column_count",
            BacktrackingTmParams {
                column_count: 0,
                ..Default::default()
            },
        ),
        (
            "cells_per_column",
            BacktrackingTmParams {
                cells_per_column: 0,
                ..Default::default()
            },
        ),
        (
            "initial_perm",
            BacktrackingTmParams {
                initial_perm: 1.5,
                ..Default::default()
            },
        ),
        (
            "connected_perm",
            BacktrackingTmParams {
                connected_perm: f32::NAN,
                ..Default::default()
            },
        ),
        (
            "activation_threshold",
            BacktrackingTmParams {
                activation_threshold: 0,
                ..Default::default()
            },
        ),
        (
            "min_threshold",
            BacktrackingTmParams {
                min_threshold: 0,
                ..Default::default()
            },
        ),
        (
            "pam_length",
            BacktrackingTmParams {
                pam_length: 0,
                ..Default::default()
            },
        ),
        (
            "max_synapses_per_segment",
            BacktrackingTmParams {
                max_synapses_per_segment: 10,
                ..Default::default()
            },
        ),
        (
            "max_segments_per_cell",
            BacktrackingTmParams {
                max_segments_per_cell: 0,
                ..Default::default()
            },
        ),
        (
            "global_decay",
            BacktrackingTmParams {
                global_decay: 0.1,
                max_age: 10,
                ..Default::default()
            },
        ),
        (
            "max_age",
            BacktrackingTmParams {
                max_age: 100,
                ..Default::default()
            },
        ),
        (
            "max_age",
            BacktrackingTmParams {
                global_decay: 0.1,
                max_segments_per_cell: -1,
                max_synapses_per_segment: -1,
                ..Default::default()
            },
        ),
    ];
    for (name, params) in cases {
        let err = BacktrackingTm::new(params).expect_err(name);
        let ParamError::Invalid { name: got, .. } = &err;
        assert_eq!(*got, name, "{err}");
        assert!(err.to_string().contains(name));
    }
    // Unbounded (non-fixed-size) mode with global decay is fine.
    assert!(BacktrackingTm::new(BacktrackingTmParams {
        global_decay: 0.05,
        max_age: 50,
        max_segments_per_cell: -1,
        max_synapses_per_segment: -1,
        ..Default::default()
    })
    .is_ok());
}

#[test]
fn duty_cycle_follows_cells4_tiers() {
    let mut pow = PowCache::default();
    let mut m = SegmentMeta {
        last_pos_duty_cycle: 1.0,
        last_pos_duty_cycle_iteration: 1,
        ..Default::default()
    };
    m.set_positive_activations(5);
    // Tier 0: positive activations over iterations, cached.
    assert_eq!(m.duty_cycle(50, false, false, &mut pow), 5.0 / 50.0);
    assert_eq!(m.duty_cycle(100, false, false, &mut pow), 0.05);
    assert_eq!(m.last_pos_duty_cycle_iteration, 100);
    // Past 100: exponential decay at alpha 0.0032, plus alpha when active.
    let expected = (1.0f64 - 0.0032f32 as f64).powf(50.0) as f32 * 0.05;
    assert_eq!(m.duty_cycle(150, false, true, &mut pow), expected);
    assert_eq!(
        m.last_pos_duty_cycle_iteration, 100,
        "read-only leaves the cache"
    );
    assert_eq!(m.duty_cycle(150, true, false, &mut pow), expected + 0.0032);
    assert_eq!(
        m.duty_cycle(150, false, false, &mut pow),
        expected + 0.0032,
        "cached, age 0"
    );
    // The rate drops once past 320.
    let before = m.last_pos_duty_cycle;
    let expected = (1.0f64 - 0.0010f32 as f64).powf(250.0) as f32 * before;
    assert_eq!(m.duty_cycle(400, false, false, &mut pow), expected);
}

#[test]
fn repeating_sequence_is_learned_and_a_novel_input_scores_one() {
    let (seq, unused) = disjoint_sdrs(3, 2048, 10, 40);
    let mut tm = tm(BacktrackingTmParams::default());
    let mut last_rounds = Vec::new();
    for rep in 0..40 {
        for p in &seq {
            let a = tm.compute(p, true);
            if rep >= 38 {
                last_rounds.push(a);
            }
        }
    }
    assert!(
        last_rounds.iter().all(|&a| a < 0.05),
        "anomaly after learning: {last_rounds:?}"
    );
    // Each next element is predicted.
    assert!(overlap(tm.predicted_columns(), &seq[0]) >= 38);
    let novel = &unused[..40];
    assert_eq!(tm.compute(novel, true), 1.0);
    assert!(tm.num_segments() > 0);
}

#[test]
fn first_input_after_reset_is_fully_anomalous_and_start_cells_fire() {
    let (seq, _) = disjoint_sdrs(4, 2048, 4, 40);
    let mut tm = tm(BacktrackingTmParams::default());
    for _ in 0..10 {
        for p in &seq {
            tm.compute(p, true);
        }
    }
    tm.reset();
    assert!(tm.predicted_columns().is_empty());
    assert_eq!(tm.compute(&seq[1], false), 1.0);
    let cpc = tm.params().cells_per_column;
    assert_eq!(tm.active_cells().len(), 40);
    assert!(tm.active_cells().iter().all(|c| c % cpc == 0));
    assert_eq!(tm.compute(&[], false), 0.0, "no input, no anomaly");
}

#[test]
fn high_order_sequences_keep_their_context() {
    let (s, _) = disjoint_sdrs(5, 2048, 6, 40);
    let (a, b, c, d, x, y) = (&s[0], &s[1], &s[2], &s[3], &s[4], &s[5]);
    let mut tm = tm(BacktrackingTmParams::default());
    for _ in 0..15 {
        for seq in [[a, b, c, d], [x, b, c, y]] {
            tm.reset();
            for p in seq {
                tm.compute(p, true);
            }
        }
    }
    for (first, expected, other) in [(a, d, y), (x, y, d)] {
        tm.reset();
        tm.compute(first, false);
        tm.compute(b, false);
        let anomaly_c = tm.compute(c, false);
        assert!(anomaly_c < 0.05, "C is predicted in both contexts");
        let predicted = tm.predicted_columns();
        assert!(
            overlap(predicted, expected) >= 38,
            "expected successor predicted: {} of 40",
            overlap(predicted, expected)
        );
        assert!(
            overlap(predicted, other) <= 4,
            "other context's successor predicted: {} of 40",
            overlap(predicted, other)
        );
        // The predicted cells sit in the expected columns only.
        let cpc = tm.params().cells_per_column;
        let mut cols: Vec<u32> = tm.predictive_cells().iter().map(|c| c / cpc).collect();
        cols.dedup();
        assert!(overlap(&cols, expected) >= 38 && overlap(&cols, other) == 0);
        assert!(tm.compute(expected, false) < 0.05);
    }
}

/// Learns `seq` on a loop, then feeds a noise input and resumes `seq` from its middle;
/// returns the anomaly scores from the resume point on.
fn resume_after_noise(params: BacktrackingTmParams) -> (Vec<f32>, BacktrackingTm) {
    let (pats, unused) = disjoint_sdrs(6, 2048, 30, 40);
    let noise = unused[..40].to_vec();
    let mut tm = tm(params);
    for _ in 0..25 {
        for p in &pats {
            tm.compute(p, true);
        }
    }
    for p in &pats[..8] {
        tm.compute(p, true);
    }
    assert_eq!(tm.compute(&noise, true), 1.0);
    let scores = pats[15..25].iter().map(|p| tm.compute(p, true)).collect();
    (scores, tm)
}

#[test]
fn backtracking_recovers_a_sequence_after_a_break() {
    let (with_bt, tm_bt) = resume_after_noise(BacktrackingTmParams::default());
    // The first resumed input cannot be predicted after noise; the second is.
    assert!(
        with_bt[1..].iter().all(|&a| a < 0.05),
        "recovery with backtracking: {with_bt:?}"
    );
    assert!(tm_bt.backtrack_stats().inference_backtracks > 0);
    assert!(tm_bt.backtrack_stats().learning_backtracks > 0);

    let (without, _) = resume_after_noise(BacktrackingTmParams {
        max_inf_backtrack: 0,
        ..Default::default()
    });
    let recovery = |s: &[f32]| s.iter().position(|&a| a < 0.05).unwrap_or(s.len());
    assert!(recovery(&with_bt) <= 1);
    assert!(recovery(&with_bt) <= recovery(&without));
}

#[test]
fn inference_backtracking_locks_onto_start_cells() {
    let (s, _) = disjoint_sdrs(7, 2048, 5, 40);
    let train = |max_inf_backtrack| {
        let mut tm = tm(BacktrackingTmParams {
            max_inf_backtrack,
            ..Default::default()
        });
        for _ in 0..12 {
            tm.reset();
            for p in &s {
                tm.compute(p, true);
            }
        }
        // Replay the sequence twice without a reset: the second "A" follows "E", which
        // never preceded it, so the sequence is lost there.
        tm.reset();
        for p in &s {
            tm.compute(p, false);
        }
        let locks_before = tm.backtrack_stats().inference_lock_ons;
        tm.compute(&s[0], false);
        (tm, locks_before)
    };
    let cpc = BacktrackingTmParams::default().cells_per_column;

    let (tm_bt, locks_before) = train(10);
    // Backtracking found that "A" starts a known sequence: only its start cells are active.
    assert_eq!(tm_bt.active_cells().len(), 40);
    assert!(tm_bt.active_cells().iter().all(|c| c % cpc == 0));
    assert_eq!(tm_bt.backtrack_stats().inference_lock_ons, locks_before + 1);
    assert!(overlap(tm_bt.predicted_columns(), &s[1]) >= 38);

    // Without backtracking the columns burst.
    let (tm_plain, _) = train(0);
    assert_eq!(tm_plain.active_cells().len(), 40 * cpc as usize);
    assert!(overlap(tm_plain.predicted_columns(), &s[1]) >= 38);
}

fn small_fixed_params() -> BacktrackingTmParams {
    BacktrackingTmParams {
        column_count: 256,
        cells_per_column: 4,
        new_synapse_count: 10,
        max_synapses_per_segment: 12,
        max_segments_per_cell: 2,
        min_threshold: 5,
        activation_threshold: 6,
        ..Default::default()
    }
}

#[test]
fn segment_and_synapse_limits_hold() {
    let params = small_fixed_params();
    let mut tm = tm(params.clone());
    let mut rng = Random::new(11);
    let pop: Vec<u32> = (0..params.column_count).collect();
    // A few recurring patterns among random ones, so segments are both grown and reused.
    let recurring: Vec<Vec<u32>> = (0..6)
        .map(|_| {
            let mut s = rng.sample(&pop, 20);
            s.sort_unstable();
            s
        })
        .collect();
    let mut saw_full_cell = false;
    for step in 0..1500 {
        let p = if rng.below(3) == 0 {
            let mut s = rng.sample(&pop, 20);
            s.sort_unstable();
            s
        } else {
            recurring[step % recurring.len()].clone()
        };
        tm.compute(&p, true);
        if step % 100 == 99 {
            for cell in 0..params.num_cells() as u32 {
                let slots = tm.segment_slots_on_cell(cell);
                assert!(slots <= 2, "cell {cell} has {slots} segment slots");
                saw_full_cell |= slots == 2;
                let segs: Vec<SegmentId> = tm.segments_on_cell(cell).collect();
                assert!(segs.len() <= slots);
                if cell % params.cells_per_column == 0 {
                    assert!(segs.is_empty(), "start cell {cell} grew a segment");
                }
                for &seg in &segs {
                    let n = tm.segment_synapses(seg).len();
                    assert!((1..=12).contains(&n), "segment with {n} synapses");
                }
            }
        }
    }
    check_invariants(&tm);
    assert!(saw_full_cell, "the test should reach the segment cap");
    assert!(tm.num_synapses() <= tm.num_segments() * 12);
}

#[test]
fn synapse_freeing_drops_weakest_inactive_first_with_presyn_ties() {
    let mut tm = tm(small_fixed_params());
    tm.lrn_iteration = 1;
    // Cell 5 (column 1, index 1) with 12 synapses from cells 100..112.
    let presyn: Vec<u32> = (100..112).collect();
    let seg = tm.create_segment(5, &presyn, true);
    let perm_of = |tm: &BacktrackingTm, p: u32| {
        tm.segment_synapses(seg)
            .iter()
            .find(|s| s.presyn() == p)
            .map(|s| tm.permanence(s))
    };
    for p in presyn {
        let perm = match p {
            103 => 0.41,
            107 => 0.41,
            110 => 0.31,
            _ => 0.61,
        };
        set_perm(&mut tm, seg, p, perm);
    }
    // Active: 100, 101 (existing) plus 3 new cells → 12 + 3 > 12, so 3 must go:
    // the weakest inactive ones after the decrement: 110 (0.21), then 103 and 107 (0.31 each).
    let update = [100, 101, 200, 201, 202];
    tm.adapt_segment(5, Some(seg), &update, false);
    assert_eq!(tm.segment_synapses(seg).len(), 12);
    check_invariants(&tm);
    for gone in [103, 107, 110] {
        assert_eq!(perm_of(&tm, gone), None, "{gone} should be freed");
    }
    assert!((perm_of(&tm, 100).unwrap() - 0.71).abs() < 1e-6);
    assert!((perm_of(&tm, 104).unwrap() - 0.51).abs() < 1e-6);
    assert_eq!(perm_of(&tm, 201), Some(0.21));

    // Now only two of the weakest can go: ties at equal permanence go to the lowest
    // presynaptic cell.
    let cells: Vec<u32> = tm
        .segment_synapses(seg)
        .iter()
        .map(|s| s.presyn())
        .collect();
    for &p in &cells {
        set_perm(&mut tm, seg, p, 0.61);
    }
    let update = [100, 101, 300, 301];
    tm.adapt_segment(5, Some(seg), &update, false);
    assert_eq!(perm_of(&tm, 102), None);
    assert_eq!(perm_of(&tm, 104), None);
    assert!(perm_of(&tm, 105).is_some());
    assert_eq!(perm_of(&tm, 300), Some(0.21));

    // Decrements that reach zero remove synapses; an emptied segment frees its slot.
    let cells: Vec<u32> = tm
        .segment_synapses(seg)
        .iter()
        .map(|s| s.presyn())
        .collect();
    for &p in &cells {
        set_perm(&mut tm, seg, p, 0.01);
    }
    tm.adapt_segment(5, Some(seg), &[], false);
    assert!(!tm.segments[seg as usize].alive());
    check_invariants(&tm);
    assert_eq!(tm.segment_slots_on_cell(5), 1, "the slot stays, empty");
    let again = tm.create_segment(5, &[1, 2], true);
    assert_eq!(tm.segments[again as usize].slot(), 0, "freed slot reused");
    assert_eq!(tm.segment_slots_on_cell(5), 1);
}

#[test]
fn full_column_releases_its_lowest_duty_cycle_segment() {
    let mut tm = tm(small_fixed_params());
    tm.lrn_iteration = 50;
    // Column 2 has cells 9, 10, 11 available; fill each with 2 segments.
    let mut segs = Vec::new();
    for cell in 9..12 {
        for k in 0..2 {
            segs.push(tm.create_segment(cell, &[20 + k, 30 + k], true));
        }
    }
    for (i, &s) in segs.iter().enumerate() {
        tm.segments[s as usize].set_positive_activations(10 + i as u32);
    }
    tm.segments[segs[3] as usize].set_positive_activations(2); // cell 10, slot 1
    let cell = tm.cell_for_new_segment(2);
    assert_eq!(cell, 10);
    assert!(!tm.segments[segs[3] as usize].alive());
    assert_eq!(tm.cell_slots.free_slots(10), &[1]);
    // A column with room picks a random non-start cell below the cap.
    for _ in 0..20 {
        let c = tm.cell_for_new_segment(3);
        assert!((13..16).contains(&c));
    }
}

#[test]
fn learning_off_changes_no_synapse() {
    let stream = nab_like_stream(600, 21);
    let mut tm = tm(BacktrackingTmParams::default());
    for cols in &stream[..400] {
        tm.compute(cols, true);
    }
    let before = all_synapses(&tm);
    let segments_before = tm.num_segments();
    let (noise, _) = disjoint_sdrs(22, 2048, 3, 40);
    for cols in stream[400..].iter().chain(&noise) {
        tm.compute(cols, false);
    }
    assert_eq!(all_synapses(&tm), before);
    assert_eq!(tm.num_segments(), segments_before);
}

/// Slot blocks survive a round trip through their flat form with every slot and free stack
/// (freed slots are taken most recent first).
#[test]
fn slots_round_trip_with_their_free_stacks() {
    let stream = nab_like_stream(400, 5);
    let mut tm = tm(BacktrackingTmParams {
        max_segments: 60,
        ..BacktrackingTmParams::default()
    });
    for cols in &stream {
        tm.compute(cols, true);
    }
    let cfg = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&tm.cell_slots, cfg).unwrap();
    let (back, _): (CellSlots, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
    let cells: Vec<u32> = tm.cell_slots.cells().collect();
    assert_eq!(back.cells().collect::<Vec<_>>(), cells);
    let mut freed = 0;
    for &c in &cells {
        assert_eq!(back.slots(c), tm.cell_slots.slots(c));
        assert_eq!(back.free_slots(c), tm.cell_slots.free_slots(c));
        freed += back.free_slots(c).len();
    }
    assert!(freed > 0, "some slots were freed");
}

#[test]
fn serde_round_trip_continues_bit_identically() {
    let stream = nab_like_stream(500, 31);
    let mut tm = tm(BacktrackingTmParams::default());
    for cols in &stream[..300] {
        tm.compute(cols, true);
    }
    let cfg = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&tm, cfg).unwrap();
    let (mut restored, _): (BacktrackingTm, _) =
        bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
    let (mut lazy, _): (BacktrackingTm, _) =
        bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
    restored.rebuild_after_restore();
    assert_eq!(restored, tm);
    check_invariants(&restored);
    for (i, cols) in stream[300..].iter().enumerate() {
        let learn = i % 17 != 0;
        let a = tm.compute(cols, learn);
        let b = restored.compute(cols, learn);
        let c = lazy.compute(cols, learn); // rebuilds on first use
        assert_eq!(a.to_bits(), b.to_bits(), "step {i}");
        assert_eq!(a.to_bits(), c.to_bits(), "step {i}");
        assert_eq!(tm.active_cells(), restored.active_cells());
        assert_eq!(tm.predicted_columns(), restored.predicted_columns());
        assert_eq!(tm.predictive_cells(), lazy.predictive_cells());
    }
    assert_eq!(restored, tm);
    assert_eq!(lazy, tm);
}

#[test]
fn same_seed_same_run_and_output_types() {
    let stream = nab_like_stream(150, 41);
    let run = |output_type| {
        let mut tm = tm(BacktrackingTmParams {
            output_type,
            ..Default::default()
        });
        let scores: Vec<u32> = stream
            .iter()
            .map(|c| tm.compute(c, true).to_bits())
            .collect();
        (scores, tm)
    };
    let (s1, normal) = run(OutputType::Normal);
    let (s2, active) = run(OutputType::ActiveState);
    let (s3, one) = run(OutputType::ActiveState1CellPerCol);
    assert_eq!(s1, s2);
    assert_eq!(s1, s3);
    let out = normal.output_cells();
    assert!(out.len() >= normal.active_cells().len());
    assert!(normal
        .active_cells()
        .iter()
        .all(|c| out.binary_search(c).is_ok()));
    assert!(normal
        .predictive_cells()
        .iter()
        .all(|c| out.binary_search(c).is_ok()));
    assert_eq!(active.output_cells(), active.active_cells());
    let cpc = one.params().cells_per_column;
    let per_col = one.output_cells();
    let mut cols: Vec<u32> = one.active_cells().iter().map(|c| c / cpc).collect();
    cols.dedup();
    // NuPIC's argmax of cell confidence within each active column (cell 0 when all are 0).
    assert_eq!(per_col.iter().map(|c| c / cpc).collect::<Vec<_>>(), cols);
    for &cell in &per_col {
        let col = cell / cpc;
        let conf = |c: u32| {
            let cc = one.cell_confidence.iter().find(|e| e.0 == c);
            cc.map_or(0.0, |e| e.1)
        };
        assert!((col * cpc..(col + 1) * cpc).all(|c| conf(c) <= conf(cell)));
    }
}

#[test]
fn global_decay_removes_stale_synapses_in_unbounded_mode() {
    let params = BacktrackingTmParams {
        column_count: 256,
        cells_per_column: 4,
        new_synapse_count: 10,
        min_threshold: 5,
        activation_threshold: 6,
        max_segments_per_cell: -1,
        max_synapses_per_segment: -1,
        global_decay: 0.1,
        max_age: 5,
        ..Default::default()
    };
    let mut tm = tm(params);
    let (a, _) = disjoint_sdrs(51, 256, 6, 20);
    for _ in 0..5 {
        for p in &a[..3] {
            tm.compute(p, true);
        }
    }
    let grown = tm.num_synapses();
    assert!(grown > 0);
    // A disjoint stretch: the first segments go stale and decay away.
    for _ in 0..20 {
        for p in &a[3..] {
            tm.compute(p, true);
        }
    }
    let first_cols: Vec<u32> = a[..3].concat();
    let stale: usize = first_cols
        .iter()
        .flat_map(|&col| (col * 4..col * 4 + 4).map(|c| tm.segments_on_cell(c).count()))
        .sum();
    check_invariants(&tm);
    assert_eq!(
        stale, 0,
        "segments of the stale patterns should have decayed"
    );
}

/// A NAB-like stream: the TM learns its regular part and flags the excursions. Run with
/// `--release --nocapture` for the per-step timing.
#[test]
fn nab_like_stream_learns_and_reports_speed() {
    let len = if cfg!(debug_assertions) { 1600 } else { 6000 };
    let stream = nab_like_stream(len, 61);
    let mut tm = tm(BacktrackingTmParams::default());
    let start = std::time::Instant::now();
    let scores: Vec<f32> = stream.iter().map(|c| tm.compute(c, true)).collect();
    let elapsed = start.elapsed();
    let mean = |r: std::ops::Range<usize>| scores[r.clone()].iter().sum::<f32>() / r.len() as f32;
    // Fingerprint of the run: changes only if behaviour does.
    let mut crc = crc32fast::Hasher::new();
    for a in &scores {
        crc.update(&a.to_bits().to_le_bytes());
    }
    let calm = mean(1000..1400);
    let excursion = scores[1401..1406].iter().cloned().fold(0.0, f32::max);
    eprintln!(
        "btm: {len} steps in {:?} = {:.1} µs/step; segments {}, synapses {}, heap {:.1} MB; \
         mean anomaly calm {calm:.3}, excursion onset {excursion:.3}; {:?}; run crc {:08x}",
        elapsed,
        elapsed.as_secs_f64() * 1e6 / len as f64,
        tm.num_segments(),
        tm.num_synapses(),
        tm.heap_bytes() as f64 / 1e6,
        tm.backtrack_stats(),
        crc.finalize(),
    );
    check_invariants(&tm);
    assert!(calm < 0.1, "calm stretch anomaly {calm}");
    assert!(excursion > 0.9, "excursion onset anomaly {excursion}");
}

fn budget_params(max_segments: u32) -> BacktrackingTmParams {
    BacktrackingTmParams {
        max_segments,
        ..small_fixed_params()
    }
}

/// Random patterns over the small TM's 256 columns: every input is new, so segments keep
/// being created.
fn noise_stream(len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Random::new(seed);
    let pop: Vec<u32> = (0..256).collect();
    (0..len)
        .map(|_| {
            let mut s = rng.sample(&pop, 20);
            s.sort_unstable();
            s
        })
        .collect()
}

#[test]
fn max_segments_is_never_exceeded() {
    let budget = 150;
    let mut tm = tm(budget_params(budget));
    for (i, cols) in noise_stream(400, 71).iter().enumerate() {
        tm.compute(cols, true);
        assert!(
            tm.num_segments() <= budget as usize,
            "step {i}: {} segments",
            tm.num_segments()
        );
    }
    assert_eq!(tm.num_segments(), budget as usize, "noise fills the budget");
    assert!(tm.backtrack_stats().evictions > 0);
    check_invariants(&tm);
    // Without a budget the same stream grows far beyond it.
    let mut free = BacktrackingTm::new(small_fixed_params()).unwrap();
    for cols in &noise_stream(400, 71) {
        free.compute(cols, true);
    }
    assert!(free.num_segments() > 2 * budget as usize);
}

#[test]
fn eviction_frees_the_least_recently_active_segment() {
    let mut tm = tm(budget_params(3));
    // Three segments on different cells, active at iterations 10, 20 and 20.
    let mut made = Vec::new();
    for (it, cell) in [(10, 5), (20, 9), (20, 13)] {
        tm.lrn_iteration = it;
        made.push(tm.create_segment(cell, &[100 + cell, 200 + cell], true));
    }
    // Reinforcing the oldest makes it the most recent.
    tm.lrn_iteration = 30;
    tm.adapt_segment(5, Some(made[0]), &[105, 205], false);
    assert_eq!(tm.segments[made[0] as usize].last_active_iteration, 30);
    // At the budget: the tie at 20 goes to the lower id. (Freed ids are reused, so look at
    // the cells.)
    tm.lrn_iteration = 31;
    let (older_cell, newer_cell) = if made[1] < made[2] { (9, 13) } else { (13, 9) };
    let live_on = |tm: &BacktrackingTm, cell: u32| tm.segments_on_cell(cell).count();
    tm.create_segment(17, &[117], true);
    assert_eq!(live_on(&tm, older_cell), 0, "lowest id of the oldest goes");
    assert_eq!(live_on(&tm, newer_cell), 1);
    assert_eq!(live_on(&tm, 5), 1);
    tm.lrn_iteration = 32;
    tm.create_segment(21, &[121], true);
    assert_eq!(live_on(&tm, newer_cell), 0);
    assert_eq!(
        (live_on(&tm, 5), live_on(&tm, 17), live_on(&tm, 21)),
        (1, 1, 1)
    );
    assert_eq!(tm.num_segments(), 3);
    assert_eq!(tm.backtrack_stats().evictions, 2);
    check_invariants(&tm);
}

#[test]
fn budgeted_runs_are_deterministic_and_survive_a_round_trip() {
    let stream: Vec<Vec<u32>> = noise_stream(300, 81)
        .into_iter()
        .zip(nab_like_stream(300, 82))
        .enumerate()
        .map(|(i, (noise, _))| {
            // Alternate a short repeating motif with noise, so segments are both reinforced
            // and evicted.
            if i % 3 == 0 {
                noise
            } else {
                noise_stream(6, 83)[i % 6].clone()
            }
        })
        .collect();
    let run = || {
        let mut tm = tm(budget_params(120));
        let scores: Vec<u32> = stream[..200]
            .iter()
            .map(|c| tm.compute(c, true).to_bits())
            .collect();
        (scores, tm)
    };
    let (a, mut tm_a) = run();
    let (b, tm_b) = run();
    assert_eq!(a, b);
    assert_eq!(tm_a, tm_b);
    assert!(tm_a.backtrack_stats().evictions > 0);

    let cfg = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&tm_a, cfg).unwrap();
    let (mut restored, _): (BacktrackingTm, _) =
        bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
    let evictions_before = tm_a.backtrack_stats().evictions;
    for (i, cols) in stream[200..].iter().enumerate() {
        let x = tm_a.compute(cols, true);
        let y = restored.compute(cols, true);
        assert_eq!(x.to_bits(), y.to_bits(), "step {i} after restore");
    }
    assert!(tm_a.backtrack_stats().evictions > evictions_before);
    assert_eq!(restored, tm_a);
    check_invariants(&restored);
}

/// Segments on cells 5 (created at 10, reinforced at 11), 9 (at 20) and 13 (at 30).
fn history(tm: &mut BacktrackingTm) {
    tm.lrn_iteration = 10;
    let seg = tm.create_segment(5, &[105, 205], true);
    tm.lrn_iteration = 11;
    tm.adapt_segment(5, Some(seg), &[105, 205], false);
    for (it, cell) in [(20, 9), (30, 13)] {
        tm.lrn_iteration = it;
        tm.create_segment(cell, &[100 + cell, 200 + cell], true);
    }
}

#[test]
fn unreinforced_first_eviction_spares_reinforced_segments() {
    let mut tm = tm(BacktrackingTmParams {
        max_segments_eviction: Eviction::UnreinforcedFirst,
        ..budget_params(3)
    });
    // The oldest is reinforced once (but long ago, at 11); the others never are. (Learning
    // iterations only go up, as the eviction order relies on.)
    history(&mut tm);
    let live_on = |tm: &BacktrackingTm, cell: u32| tm.segments_on_cell(cell).count();
    // Plain recency would free cell 5's segment (active at 11); this frees the oldest
    // never-reinforced one, on cell 9 (created at 20), then the one on cell 13.
    tm.lrn_iteration = 40;
    tm.create_segment(17, &[117], true);
    assert_eq!(
        (live_on(&tm, 5), live_on(&tm, 9), live_on(&tm, 13)),
        (1, 0, 1)
    );
    tm.lrn_iteration = 41;
    tm.create_segment(21, &[121], true);
    assert_eq!((live_on(&tm, 5), live_on(&tm, 13)), (1, 0));
    // Cells 17 and 21 hold unreinforced segments too; they go before cell 5's, oldest first.
    tm.lrn_iteration = 42;
    tm.create_segment(25, &[125], true);
    assert_eq!(
        (live_on(&tm, 5), live_on(&tm, 17), live_on(&tm, 21)),
        (1, 0, 1)
    );
    check_invariants(&tm);

    // The same history under plain recency frees cell 5's segment first.
    let mut lru = BacktrackingTm::new(budget_params(3)).unwrap();
    history(&mut lru);
    lru.lrn_iteration = 40;
    lru.create_segment(17, &[117], true);
    assert_eq!((live_on(&lru, 5), live_on(&lru, 9)), (0, 1));
}

/// Narrow and wide counters over narrow and wide out lists, with the table cleared whole or
/// through the touched list, count every pass exactly as a direct count over the out lists
/// does, also after entries are removed and moved between lists.
#[test]
fn forward_pass_counts_match_a_direct_count_in_every_counter_mode() {
    for max_segments in [4000, 0] {
        forward_pass_counts_match_a_direct_count(OutIndex::new(64, max_segments));
    }
}

fn forward_pass_counts_match_a_direct_count(mut index: OutIndex) {
    let mut rng = Random::new(7);
    let (cells, segments) = (64u32, 4000usize);
    let mut listed = Vec::new();
    for seg in 1..segments as SegmentId {
        for _ in 0..rng.below(3) {
            let (cell, connected) = (rng.below(cells), rng.below(2) == 0);
            index.add(cell, seg, connected);
            listed.push((cell, seg, connected));
        }
    }
    for (cell, seg, connected) in listed {
        match rng.below(4) {
            0 => index.remove(cell, seg, connected),
            1 => index.set_connected(cell, seg, !connected),
            _ => {}
        }
    }
    let mut activities = [200, 1000, 1 << 20].map(|max_synapses| {
        let mut a = Activity::default();
        a.set_width(max_synapses);
        a
    });
    let widths: Vec<Width> = activities.iter().map(|a| a.width).collect();
    assert_eq!(widths, [Width::W16, Width::W32, Width::W64]);
    let mut modes = [false; 2];
    for pass in 0..40 {
        // Few active cells make passes small next to the table, so the touched list is used.
        let n = if pass % 2 == 0 { 1 } else { 40 };
        let mut active: Vec<u32> = (0..n).map(|_| rng.below(cells)).collect();
        active.sort_unstable();
        active.dedup();
        let threshold = 1 + rng.below(4);
        let mut expected = vec![(0u32, 0u32); segments];
        for &cell in &active {
            let [connected, other] = index.lists(cell);
            for seg in connected {
                expected[seg as usize].0 += 1;
                expected[seg as usize].1 += 1;
            }
            for seg in other {
                expected[seg as usize].0 += 1;
            }
        }
        let mut qualified: Vec<SegmentId> = (0..segments as SegmentId)
            .filter(|&s| expected[s as usize].0 >= threshold)
            .collect();
        for a in &mut activities {
            a.propagate(&index, segments, &active, threshold);
            modes[a.clearing.tracked as usize] = true;
            for seg in 0..segments as SegmentId {
                let counts = (a.potential(seg), a.connected(seg));
                assert_eq!(counts, expected[seg as usize], "pass {pass} segment {seg}");
            }
            let mut got = a.qualified.clone();
            got.sort_unstable();
            assert_eq!(got, qualified);
        }
        qualified.clear();
    }
    assert_eq!(modes, [true, true], "both clearing modes ran");
}

/// The vector scan of packed 8-bit counts finds what the portable scan finds, at every
/// threshold, whatever the connected halves hold.
#[test]
fn vector_scan_matches_the_portable_scan() {
    let mut rng = Random::new(11);
    for len in [0usize, 1, 63, 64, 65, 200, 8192] {
        let counts: Vec<u16> = (0..len)
            .map(|_| {
                let potential = match rng.below(8) {
                    0 => 255,
                    _ => rng.below(40) as u16,
                };
                (rng.below(256) as u16) << 8 | potential
            })
            .collect();
        for threshold in [1, 2, 13, 20, 39, 255, 256, 300] {
            let (mut portable, mut best) = (Vec::new(), Vec::new());
            scan(&counts, threshold, &mut portable);
            <u16 as Counter>::scan_best(&counts, threshold, &mut best);
            assert_eq!(best, portable, "len {len} threshold {threshold}");
        }
    }
}

/// TMs taking turns on one thread share its scratch buffers (of different counter widths
/// here) and compute exactly as each does alone; none of them holds the buffers between
/// calls.
#[test]
fn tms_sharing_a_thread_compute_as_alone() {
    let stream = nab_like_stream(200, 61);
    let narrow = BacktrackingTmParams {
        max_segments: 300,
        ..BacktrackingTmParams::default()
    };
    let wide = BacktrackingTmParams {
        max_synapses_per_segment: -1,
        max_segments_per_cell: -1,
        ..BacktrackingTmParams::default()
    };
    let alone = |params: &BacktrackingTmParams| {
        let params = params.clone();
        let stream = stream.clone();
        std::thread::spawn(move || {
            let mut tm = tm(params);
            let scores: Vec<u32> = stream
                .iter()
                .map(|c| tm.compute(c, true).to_bits())
                .collect();
            (scores, tm)
        })
        .join()
        .unwrap()
    };
    let (a_alone, tm_a_alone) = alone(&narrow);
    let (b_alone, tm_b_alone) = alone(&wide);
    let (mut a, mut b) = (tm(narrow), tm(wide));
    let (mut a_scores, mut b_scores) = (Vec::new(), Vec::new());
    for cols in &stream {
        a_scores.push(a.compute(cols, true).to_bits());
        b_scores.push(b.compute(cols, true).to_bits());
    }
    assert_eq!(a_scores, a_alone);
    assert_eq!(b_scores, b_alone);
    assert_eq!(a, tm_a_alone);
    assert_eq!(b, tm_b_alone);
    assert!(a.scratch.heap_bytes() == 0 && b.scratch.heap_bytes() == 0);
    assert!(BacktrackingTm::thread_scratch_bytes() > 0);
}

/// Segment metadata packs into five words and keeps every field through its serialised
/// form (positive activations saturating), and a slot beyond the packing is refused.
#[test]
fn segment_meta_packs_and_round_trips() {
    assert_eq!(std::mem::size_of::<SegmentMeta>(), 20);
    let cfg = bincode::config::standard();
    for (cell, slot, sequence, alive) in [
        (0, 0, false, true),
        (MAX_CELLS as u32, SegmentMeta::MAX_SLOT, true, false),
        (12345, 1023, true, true),
        (7, 1024, false, true),
    ] {
        let mut m = SegmentMeta::new(cell, slot, sequence, 77);
        m.set_positive_activations(70_000);
        m.last_active_iteration = 99;
        if !alive {
            m.release();
        }
        assert_eq!(
            (m.cell(), m.slot(), m.sequence(), m.alive()),
            (cell, slot, sequence, alive)
        );
        assert_eq!(m.positive_activations(), u32::from(u16::MAX));
        let bytes = bincode::serde::encode_to_vec(m, cfg).unwrap();
        let (back, _): (SegmentMeta, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, m);
    }
    let wire = MetaWire {
        cell_flags: 3 | MetaWire::ALIVE,
        slot: SegmentMeta::MAX_SLOT + 1,
        positive_activations: 1,
        last_active_iteration: 0,
        last_pos_duty_cycle: 0.0,
        last_pos_duty_cycle_iteration: 0,
    };
    let bytes = bincode::serde::encode_to_vec(&wire, cfg).unwrap();
    assert!(bincode::serde::decode_from_slice::<SegmentMeta, _>(&bytes, cfg).is_err());
}
