//! The guest's disk during a migration (docs/disk-and-network.md).
//!
//! With shared storage there is nothing to do. Otherwise DRBD replicates the disk between
//! the two hosts, and skyferryd steers it through the migration ([`drbd`]): asynchronous
//! replication for the bulk copy, synchronous once the disks are equal and while memory
//! moves, two primaries for the moment of the switchover, the source demoted after the
//! commit. skyferry never copies disk blocks itself; DRBD does, in the kernel.

pub mod drbd;
