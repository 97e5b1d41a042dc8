//! Outpost's integration tests: one binary, real processes.

mod algorand;
mod bad_input;
mod bitcoin;
mod cometbft;
mod delivery;
mod disk;
mod fleet;
mod fuzz_seeds;
mod ha;
mod harness;
mod health;
mod host;
mod hostile;
mod journal;
mod levels;
mod mtls;
mod network;
mod prometheus;
mod rpc_health;
mod rules;
mod shards;
mod snapshots;
mod spine;
mod subscribe;
mod ton;
mod verdicts;
