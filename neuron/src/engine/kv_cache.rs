//! The KV cache manager: fixed-size blocks of positions, who holds them, which prefix each one
//! caches, and which to evict. No tensors: the memory behind a block is the store's
//! ([`super::kv_store`]); this file only hands out block numbers, so it is tested alone.
//!
//! As in vLLM's automatic prefix caching, a full block is known by the chain of token ids before
//! and inside it. Here the key is exact rather than a hash of the chain: a block records its
//! parent block (and that block's generation, bumped every time a block is reused) and its own
//! tokens, and a lookup checks both, so two prompts can never share a block by a hash collision.
//! A block that no sequence holds stays cached until its room is needed; the least recently
//! released goes first, and a finished sequence releases its blocks last-first, so a prompt's
//! tail is evicted before its head (which more prompts share).
//!
//! Two budgets: [`BlockPool::capacity`] blocks exist at most (the running requests' budget
//! plus the prefix cache's), and the scheduler keeps the blocks running sequences hold within
//! its own budget, so the rest is always there for cached prefixes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Positions per block. Also the attention kernel's tile of keys, so a key's tile is the same
/// whichever step computes it (see `attention.rs`).
pub const BLOCK: usize = 64;

/// A block of the pool: an index into the store's memory.
pub type BlockId = u32;

/// The prefix a full block caches: its parent (block and generation, `None` for a prompt's
/// first block) and its own tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    parent: Option<(BlockId, u32)>,
    tokens: Box<[u32]>,
}

impl Key {
    fn hash64(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

#[derive(Debug, Default)]
struct Meta {
    /// Sequences holding the block.
    refs: u32,
    /// Bumped whenever the block is given a new content, so a child's parent link to an
    /// evicted block never matches the block's next use.
    generation: u32,
    /// Set once the block is full and registered for reuse.
    key: Option<Key>,
    /// Position in `lru` while cached and unheld.
    tick: Option<u64>,
}

/// What a lookup found: cached blocks that hold the prefix of a prompt, first block first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hit {
    pub blocks: Vec<BlockId>,
}

/// Blocks, their owners and their cached prefixes.
#[derive(Debug)]
pub struct BlockPool {
    capacity: usize,
    meta: Vec<Meta>,
    /// Blocks that hold nothing worth keeping (never registered, or evicted).
    free: Vec<BlockId>,
    /// Cached blocks no sequence holds, least recently released first.
    lru: BTreeMap<u64, BlockId>,
    tick: u64,
    /// Registered blocks by the hash of their key (several keys may share a hash).
    index: HashMap<u64, Vec<BlockId>>,
    held: usize,
}

impl BlockPool {
    /// A pool of at most `capacity` blocks. Block numbers are handed out from 0 up as they are
    /// first needed, so the store allocates memory only for blocks in use.
    pub fn new(capacity: usize) -> Self {
        BlockPool {
            capacity,
            meta: Vec::new(),
            free: Vec::new(),
            lru: BTreeMap::new(),
            tick: 0,
            index: HashMap::new(),
            held: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks some sequence holds.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Cached blocks no sequence holds (kept for the prompts to come).
    pub fn cached(&self) -> usize {
        self.lru.len()
    }

    /// Blocks that exist (have memory behind them in the store).
    pub fn allocated(&self) -> usize {
        self.meta.len()
    }

    /// Whether some sequence holds `block`.
    pub fn is_held(&self, block: BlockId) -> bool {
        self.meta[block as usize].refs > 0
    }

    /// Whether `block` is held by more than one sequence, or cached for reuse: then nobody may
    /// write into it.
    pub fn is_shared(&self, block: BlockId) -> bool {
        let m = &self.meta[block as usize];
        m.refs > 1 || m.key.is_some()
    }

    /// The longest run of cached blocks holding `tokens` from its start, at most `max_blocks`.
    pub fn lookup(&self, tokens: &[u32], max_blocks: usize) -> Hit {
        self.lookup_after(None, tokens, max_blocks)
    }

    /// Like [`lookup`](Self::lookup), continuing a chain after `parent` (`tokens` start right
    /// after it).
    pub fn lookup_after(&self, parent: Option<BlockId>, tokens: &[u32], max_blocks: usize) -> Hit {
        let mut hit = Hit::default();
        let mut parent = parent.map(|b| (b, self.meta[b as usize].generation));
        for chunk in tokens.chunks_exact(BLOCK).take(max_blocks) {
            let key = Key {
                parent,
                tokens: chunk.into(),
            };
            let Some(b) = self.find(&key) else { break };
            hit.blocks.push(b);
            parent = Some((b, self.meta[b as usize].generation));
        }
        hit
    }

    fn find(&self, key: &Key) -> Option<BlockId> {
        self.index
            .get(&key.hash64())?
            .iter()
            .copied()
            .find(|&b| self.meta[b as usize].key.as_ref() == Some(key))
    }

    /// A sequence takes a cached block (from a [`Hit`]).
    pub fn acquire(&mut self, block: BlockId) {
        let m = &mut self.meta[block as usize];
        if m.refs == 0 {
            if let Some(t) = m.tick.take() {
                self.lru.remove(&t);
            }
            self.held += 1;
        }
        m.refs += 1;
    }

    /// A block for new positions, held once: a free one, a new one while the pool has room,
    /// else the least recently released cached block. `None` when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let b = if let Some(b) = self.free.pop() {
            b
        } else if self.meta.len() < self.capacity {
            self.meta.push(Meta::default());
            (self.meta.len() - 1) as BlockId
        } else {
            let (_, b) = self.lru.pop_first()?;
            self.meta[b as usize].tick = None;
            self.unregister(b);
            b
        };
        let m = &mut self.meta[b as usize];
        m.generation = m.generation.wrapping_add(1);
        m.refs = 1;
        self.held += 1;
        Some(b)
    }

    /// A sequence lets go of a block: a registered block stays cached, any other is free.
    pub fn release(&mut self, block: BlockId) {
        let m = &mut self.meta[block as usize];
        debug_assert!(m.refs > 0, "block {block} released more often than held");
        m.refs = m.refs.saturating_sub(1);
        if m.refs > 0 {
            return;
        }
        self.held -= 1;
        if m.key.is_some() {
            self.tick += 1;
            m.tick = Some(self.tick);
            self.lru.insert(self.tick, block);
        } else {
            self.free.push(block);
        }
    }

    /// Registers a full block holding `tokens` after `parent`, so later prompts find it.
    /// When an equal block is registered already (two sequences computed the same prefix at
    /// once), returns that one and leaves `block` as it was: the caller should hold the
    /// returned block instead (its contents are the same numbers).
    pub fn register(&mut self, block: BlockId, parent: Option<BlockId>, tokens: &[u32]) -> BlockId {
        debug_assert_eq!(tokens.len(), BLOCK);
        let key = Key {
            parent: parent.map(|p| (p, self.meta[p as usize].generation)),
            tokens: tokens.into(),
        };
        if let Some(existing) = self.find(&key) {
            return existing;
        }
        if self.meta[block as usize].key.is_some() {
            return block;
        }
        self.index.entry(key.hash64()).or_default().push(block);
        self.meta[block as usize].key = Some(key);
        block
    }

    fn unregister(&mut self, block: BlockId) {
        let Some(key) = self.meta[block as usize].key.take() else {
            return;
        };
        let h = key.hash64();
        if let Some(v) = self.index.get_mut(&h) {
            v.retain(|&b| b != block);
            if v.is_empty() {
                self.index.remove(&h);
            }
        }
    }

    /// Forgets every cached block no sequence holds (their memory stays for reuse).
    pub fn clear_cached(&mut self) {
        while let Some((_, b)) = self.lru.pop_first() {
            self.meta[b as usize].tick = None;
            self.unregister(b);
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 100_000 + i).collect()
    }

    /// Holds blocks for `tokens` (registering the full ones) and releases them, as a finished
    /// sequence does; returns the blocks.
    fn run(pool: &mut BlockPool, tokens: &[u32]) -> Vec<BlockId> {
        let hit = pool.lookup(tokens, tokens.len() / BLOCK);
        let mut blocks = hit.blocks.clone();
        for &b in &blocks {
            pool.acquire(b);
        }
        while blocks.len() < tokens.len().div_ceil(BLOCK) {
            blocks.push(pool.allocate().expect("room"));
        }
        for i in hit.blocks.len()..tokens.len() / BLOCK {
            let parent = i.checked_sub(1).map(|p| blocks[p]);
            let b = pool.register(blocks[i], parent, &tokens[i * BLOCK..][..BLOCK]);
            assert_eq!(b, blocks[i]);
        }
        for &b in blocks.iter().rev() {
            pool.release(b);
        }
        blocks
    }

    #[test]
    fn a_finished_prompt_is_found_again_block_by_block() {
        let mut pool = BlockPool::new(16);
        let a = toks(1, 3 * BLOCK + 10);
        let blocks = run(&mut pool, &a);
        assert_eq!(pool.held(), 0);
        assert_eq!(
            pool.cached(),
            3,
            "the three full blocks stay, the partial one is freed"
        );
        let hit = pool.lookup(&a, 10);
        assert_eq!(hit.blocks, blocks[..3]);
        // A prompt that parts from it in its third block shares the first two.
        let mut b = a.clone();
        b[2 * BLOCK + 5] = 7;
        assert_eq!(pool.lookup(&b, 10).blocks, blocks[..2]);
        // The same tokens at another place in a prompt are another prefix.
        let mut c = toks(9, BLOCK);
        c.extend_from_slice(&a[..BLOCK]);
        assert!(pool.lookup(&c, 10).blocks.is_empty());
        // A lookup never returns more than asked.
        assert_eq!(pool.lookup(&a, 1).blocks, blocks[..1]);
    }

    #[test]
    fn eviction_takes_the_least_recently_released_and_a_prompts_tail_first() {
        let mut pool = BlockPool::new(4);
        let a = toks(1, 2 * BLOCK);
        let b = toks(2, 2 * BLOCK);
        run(&mut pool, &a);
        run(&mut pool, &b);
        assert_eq!(pool.cached(), 4);
        // One new block evicts a's tail (released before a's head, and before all of b).
        let x = pool.allocate().expect("room");
        assert_eq!(pool.lookup(&a, 2).blocks.len(), 1, "a keeps its head");
        assert_eq!(pool.lookup(&b, 2).blocks.len(), 2, "b is untouched");
        // A hit makes a block recent: b's head, taken and released again, outlives a's head.
        let hb = pool.lookup(&b, 1).blocks[0];
        pool.acquire(hb);
        pool.release(hb);
        let y = pool.allocate().expect("room");
        assert!(pool.lookup(&a, 2).blocks.is_empty());
        let z = pool.allocate().expect("room");
        assert_eq!(
            pool.lookup(&b, 2).blocks.len(),
            1,
            "b's tail went before its head"
        );
        assert_eq!(pool.held(), 3);
        for blk in [x, y, z] {
            pool.release(blk);
        }
    }

    #[test]
    fn held_blocks_are_never_evicted_and_a_full_pool_says_so() {
        let mut pool = BlockPool::new(2);
        let a = toks(1, BLOCK);
        let hit = pool.lookup(&a, 1);
        assert!(hit.blocks.is_empty());
        let b0 = pool.allocate().unwrap();
        assert_eq!(pool.register(b0, None, &a), b0);
        let b1 = pool.allocate().unwrap();
        assert_eq!(pool.allocate(), None, "both blocks are held");
        pool.release(b1);
        assert_eq!(pool.allocate(), Some(b1), "a freed block comes back first");
        assert_eq!(
            pool.lookup(&a, 1).blocks,
            vec![b0],
            "held and registered: still found"
        );
    }

    #[test]
    fn a_reused_block_does_not_pass_for_its_old_prefix() {
        let mut pool = BlockPool::new(2);
        let a = toks(1, 2 * BLOCK);
        let [p, c] = run(&mut pool, &a)[..] else {
            panic!("two blocks")
        };
        // Hold the second block so that the next allocation evicts the first, then give the
        // first other tokens: a prompt of those tokens followed by a's second block must not
        // find the second block, which was computed after a's first block.
        pool.acquire(c);
        let reused = pool.allocate().unwrap();
        assert_eq!(reused, p);
        let mut x = toks(5, BLOCK);
        pool.register(reused, None, &x);
        x.extend_from_slice(&a[BLOCK..]);
        assert_eq!(pool.lookup(&x, 2).blocks, vec![reused]);
        assert!(
            pool.lookup(&a, 2).blocks.is_empty(),
            "a's first block is gone"
        );
    }

    #[test]
    fn registering_an_equal_block_returns_the_first() {
        let mut pool = BlockPool::new(4);
        let a = toks(1, BLOCK);
        let first = pool.allocate().unwrap();
        let second = pool.allocate().unwrap();
        assert_eq!(pool.register(first, None, &a), first);
        assert_eq!(pool.register(second, None, &a), first);
        assert!(!pool.is_shared(second), "the duplicate stays private");
        pool.acquire(first);
        pool.release(second);
        assert_eq!(pool.held(), 1);
        pool.release(first);
        pool.release(first);
        assert_eq!((pool.held(), pool.cached()), (0, 1));
    }

    #[test]
    fn clearing_forgets_unheld_prefixes_only() {
        let mut pool = BlockPool::new(8);
        let a = toks(1, 2 * BLOCK);
        run(&mut pool, &a);
        let held = pool.lookup(&a, 1).blocks[0];
        pool.acquire(held);
        pool.clear_cached();
        assert_eq!(pool.cached(), 0);
        assert_eq!(pool.lookup(&a, 2).blocks, vec![held]);
    }
}
