//! The one integration-test binary (`autotests = false` keeps link times
//! down); each module is one area.

mod nfs_proto;
mod support;
