//! The one place where datastore errors become NFS status codes.

use nfs3_types::nfs3::nfsstat3;

use crate::datastore::DatastoreError;

/// Map a datastore error to the `nfsstat3` a client sees.
///
/// I/O errors are logged here, because they are the ones an operator must
/// look at; the others are ordinary protocol outcomes.
pub fn nfsstat(err: &DatastoreError) -> nfsstat3 {
    match err {
        DatastoreError::NotFound => nfsstat3::NFS3ERR_NOENT,
        DatastoreError::Exists => nfsstat3::NFS3ERR_EXIST,
        DatastoreError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        DatastoreError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        DatastoreError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        DatastoreError::Access => nfsstat3::NFS3ERR_ACCES,
        DatastoreError::Io(e) => {
            tracing::warn!(cause = %e, "backend i/o error");
            nfsstat3::NFS3ERR_IO
        }
        DatastoreError::InvalidName | DatastoreError::Invalid => nfsstat3::NFS3ERR_INVAL,
        DatastoreError::Stale => nfsstat3::NFS3ERR_STALE,
        DatastoreError::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        DatastoreError::ReadOnly => nfsstat3::NFS3ERR_ROFS,
        DatastoreError::NotSupported => nfsstat3::NFS3ERR_NOTSUPP,
        DatastoreError::BadCookie => nfsstat3::NFS3ERR_BAD_COOKIE,
        DatastoreError::TooBig => nfsstat3::NFS3ERR_FBIG,
        DatastoreError::NotSync => nfsstat3::NFS3ERR_NOT_SYNC,
        DatastoreError::Jukebox => nfsstat3::NFS3ERR_JUKEBOX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_common_errors() {
        assert_eq!(nfsstat(&DatastoreError::NotFound), nfsstat3::NFS3ERR_NOENT);
        assert_eq!(nfsstat(&DatastoreError::Stale), nfsstat3::NFS3ERR_STALE);
        assert_eq!(
            nfsstat(&DatastoreError::NotSupported),
            nfsstat3::NFS3ERR_NOTSUPP
        );
        let io = DatastoreError::Io(std::io::Error::other("disk"));
        assert_eq!(nfsstat(&io), nfsstat3::NFS3ERR_IO);
    }
}
