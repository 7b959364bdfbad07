//! Records lost on the way, found by their numbers.
//!
//! The SDK numbers each plugin run's records from 1 without gaps, and the agent
//! names the plugin and the run in every record it forwards. Batches arrive in
//! order, so within a run a number that skips ahead means the records in between
//! went missing somewhere between the plugin and the server, whatever the cause
//! (an eviction from a full spool, a fault). [`Gaps`] follows one agent's stream.
//!
//! Where the numbering stood is stored with the agent's stream mark, so a gap
//! across a reconnect is found too, such as the records of batches the agent
//! evicted from its full spool while disconnected. What was stored is trusted
//! only when the stream carries on from it: its first new batch is the stored
//! mark's next, or the agent says (`PackagedData.acked`, in a stream's first
//! batch) that it never saw anything past the stored mark acknowledged. A server
//! that died after acknowledging batches it had not yet stored would otherwise
//! count records it did receive. An untrusted start counts from each plugin's
//! first record in the stream, and what it stores says it is partial: a plugin
//! first seen later is never presumed to have started at 1. A stream whose first
//! batch is 1 starts from nothing: the agent's spool is fresh, so the agent and
//! every plugin started anew, and a plugin's first record numbered above 1 shows
//! the ones before it lost.
//!
//! Not found: records lost at the end of a run (a plugin killed with records
//! still in its buffer, or the agent killed with records in the pipe): nothing
//! follows them.

use std::collections::BTreeMap;

/// Where one plugin's numbering stands: its run and its last record.
type Runs = BTreeMap<String, (u32, u64)>;

/// Records of a plugin run found missing: numbers `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// The plugin.
    pub plugin: String,
    /// Its run.
    pub instance: u32,
    /// First missing number.
    pub first: u64,
    /// Last missing number.
    pub last: u64,
}

impl Lost {
    /// How many records.
    pub fn count(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// The gaps one batch showed in one plugin's numbering, summed: logged and
/// stored once per plugin and batch, however many there were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// The run of the last gap.
    pub instance: u32,
    /// How many gaps.
    pub gaps: u64,
    /// How many records they hold.
    pub records: u64,
    /// The lowest missing number.
    pub first: u64,
    /// The highest missing number.
    pub last: u64,
}

impl Tally {
    /// A tally of one gap.
    pub fn new(l: &Lost) -> Self {
        Self {
            instance: l.instance,
            gaps: 1,
            records: l.count(),
            first: l.first,
            last: l.last,
        }
    }

    /// Adds another gap of the same plugin.
    pub fn add(&mut self, l: &Lost) {
        self.instance = l.instance;
        self.gaps += 1;
        self.records += l.count();
        self.first = self.first.min(l.first);
        self.last = self.last.max(l.last);
    }
}

/// Where the numbering stood, as stored with a stream mark.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Snapshot {
    /// Whether `runs` holds every plugin that ever sent a numbered record in this
    /// sequence space: then a plugin's first record numbered above 1 shows the
    /// ones before it lost.
    complete: bool,
    runs: Runs,
}

/// One agent stream's view of its plugins' numbering.
#[derive(Debug, Default)]
pub struct Gaps {
    now: Snapshot,
    /// What was stored, with the mark `(epoch, seq)` it belongs to, until the
    /// first new batch says whether it can be trusted.
    stored: Option<((u64, u64), Snapshot)>,
    /// The agent's acknowledged point `(epoch, seq)` when the stream opened.
    acked: Option<(u64, u64)>,
    decided: bool,
    changed: bool,
}

impl Gaps {
    /// Starts from what was stored with the mark `(epoch, seq)`; `sources` as
    /// [`Gaps::snapshot`] wrote it. Empty (not known) or unreadable starts afresh.
    pub fn restore(epoch: u64, seq: u64, sources: &str) -> Self {
        Self {
            stored: serde_json::from_str(sources).ok().map(|snap| ((epoch, seq), snap)),
            ..Self::default()
        }
    }

    /// The stream's first batch said the agent had seen batches of `epoch` up to
    /// `acked` acknowledged.
    pub fn resumed(&mut self, epoch: u64, acked: u64) {
        self.acked = Some((epoch, acked));
    }

    /// A new (not duplicate) batch `(epoch, seq)` begins; 0 for an unnumbered one.
    /// The first numbered one decides where the numbering starts: nowhere before
    /// it at seq 1 (a fresh spool: the agent, and so every plugin, started anew);
    /// from what was stored when the stream carries on from it; else from nothing
    /// known.
    pub fn batch(&mut self, epoch: u64, seq: u64) {
        if seq == 0 || std::mem::replace(&mut self.decided, true) {
            return;
        }
        self.changed = true;
        let stored = self.stored.take();
        self.now = if seq == 1 {
            Snapshot {
                complete: true,
                runs: Runs::new(),
            }
        } else {
            match stored {
                Some((mark, snap))
                    if mark.0 == epoch
                        && seq > mark.1
                        && (mark.1 + 1 == seq || self.acked.is_some_and(|(e, a)| e == epoch && a <= mark.1)) =>
                {
                    snap
                }
                _ => Snapshot::default(),
            }
        };
    }

    /// Takes in a record of `plugin`'s run `instance` numbered `seq`; returns what
    /// its number shows missing.
    pub fn record(&mut self, plugin: &str, instance: u32, seq: u64) -> Option<Lost> {
        if seq == 0 || plugin.is_empty() {
            return None;
        }
        self.changed = true;
        let lost = |first: u64, last: u64| Lost {
            plugin: plugin.to_owned(),
            instance,
            first,
            last,
        };
        let complete = self.now.complete;
        let Some(run) = self.now.runs.get_mut(plugin) else {
            self.now.runs.insert(plugin.to_owned(), (instance, seq));
            return (complete && seq > 1).then(|| lost(1, seq - 1));
        };
        if run.0 != instance {
            // A new run: it numbers from 1.
            *run = (instance, seq);
            return (seq > 1).then(|| lost(1, seq - 1));
        }
        let gap = (seq > run.1 + 1).then(|| lost(run.1 + 1, seq - 1));
        run.1 = run.1.max(seq);
        gap
    }

    /// The JSON to store with the mark, if anything changed since the last call.
    pub fn snapshot(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        Some(serde_json::to_string(&self.now).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_within_a_run_is_lost() {
        let mut g = Gaps::default();
        assert_eq!(g.record("p", 7, 1), None);
        assert_eq!(g.record("p", 7, 2), None);
        let lost = g.record("p", 7, 10).unwrap();
        assert_eq!((lost.first, lost.last, lost.count()), (3, 9, 7));
        // A repeat or an older number is not a gap.
        assert_eq!(g.record("p", 7, 10), None);
        assert_eq!(g.record("p", 7, 4), None);
        assert_eq!(g.record("p", 7, 11), None);
        // Other plugins and unnumbered records are apart.
        assert_eq!(g.record("q", 1, 5), None);
        assert_eq!(g.record("q", 1, 0), None);
        assert_eq!(g.record("", 1, 9), None);
    }

    #[test]
    fn a_new_run_numbers_from_one() {
        let mut g = Gaps::default();
        g.record("p", 1, 50);
        assert_eq!(g.record("p", 2, 1), None);
        let lost = g.record("p", 3, 4).unwrap();
        assert_eq!((lost.instance, lost.first, lost.last), (3, 1, 3));
    }

    #[test]
    fn a_batch_s_gaps_of_one_plugin_are_summed() {
        let gap = |instance, first, last| Lost {
            plugin: "p".into(),
            instance,
            first,
            last,
        };
        let mut t = Tally::new(&gap(1, 10, 12));
        t.add(&gap(1, 3, 3));
        t.add(&gap(2, 20, 29));
        assert_eq!(
            t,
            Tally {
                instance: 2,
                gaps: 3,
                records: 14,
                first: 3,
                last: 29
            }
        );
    }

    #[test]
    fn the_stored_numbering_counts_only_when_the_stream_carries_on_from_it() {
        // An agent's fresh spool starts at batch 1: nothing came before it.
        let mut first = Gaps::default();
        first.batch(9, 1);
        first.record("p", 1, 100);
        let stored = first.snapshot().unwrap();
        assert_eq!(first.snapshot(), None, "nothing changed since");

        // The next batch after the stored mark: a skip across the reconnect counts,
        // and so do the first records of a plugin not seen before.
        let mut g = Gaps::restore(9, 20, &stored);
        g.batch(9, 21);
        assert_eq!(g.record("p", 1, 150).map(|l| l.count()), Some(49));
        assert_eq!(g.record("new", 4, 30).map(|l| l.count()), Some(29));

        // Batches in between that this server may have taken without storing
        // where the numbering stood: nothing to compare.
        let mut g = Gaps::restore(9, 20, &stored);
        g.resumed(9, 24);
        g.batch(9, 25);
        assert_eq!(g.record("p", 1, 150), None);
        assert_eq!(g.record("p", 1, 152).map(|l| l.count()), Some(1));
        assert_eq!(g.record("new", 4, 30), None);
        // What such a stream stores knows only the plugins it saw: a later stream
        // carrying on from it presumes nothing of the others.
        let partial = g.snapshot().unwrap();
        let mut g = Gaps::restore(9, 30, &partial);
        g.batch(9, 31);
        assert_eq!(g.record("other", 2, 500), None);
        assert_eq!(g.record("p", 1, 160).map(|l| l.count()), Some(7));

        // Batches in between that the agent never saw acknowledged: it evicted
        // them, and their records count.
        let mut g = Gaps::restore(9, 20, &stored);
        g.resumed(9, 20);
        g.batch(9, 25);
        assert_eq!(g.record("p", 1, 150).map(|l| l.count()), Some(49));

        // Another sequence space, or garbage stored: afresh.
        let mut g = Gaps::restore(8, 20, &stored);
        g.batch(9, 21);
        assert_eq!(g.record("p", 1, 150), None);
        for unknown in ["", "not json", "{}"] {
            let mut g = Gaps::restore(9, 20, unknown);
            g.batch(9, 21);
            assert_eq!(g.record("p", 1, 150), None, "{unknown:?}");
        }
        // With nothing stored, nothing is known about the records before, unless
        // the stream starts the sequence space.
        let mut g = Gaps::default();
        g.batch(9, 21);
        assert_eq!(g.record("p", 1, 150), None);
        let mut g = Gaps::default();
        g.batch(0, 0);
        g.batch(9, 1);
        assert_eq!(g.record("p", 1, 150).map(|l| l.count()), Some(149));
    }
}
