//! Unit tests of the SCSI commands against a MemDevice.
