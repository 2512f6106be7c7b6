//! The one place where backend errors become NFS status codes.

use nfs3_types::nfs3::nfsstat3;

use super::backend::BackendError;

/// Map a backend error to the `nfsstat3` a client sees.
///
/// I/O errors are logged here, because they are the ones an operator must
/// look at; the others are ordinary protocol outcomes.
pub fn nfsstat(err: &BackendError) -> nfsstat3 {
    match err {
        BackendError::NotFound => nfsstat3::NFS3ERR_NOENT,
        BackendError::Exists => nfsstat3::NFS3ERR_EXIST,
        BackendError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        BackendError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        BackendError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        BackendError::Access => nfsstat3::NFS3ERR_ACCES,
        BackendError::Io(e) => {
            tracing::warn!(cause = %e, "backend i/o error");
            nfsstat3::NFS3ERR_IO
        }
        BackendError::InvalidName | BackendError::Invalid => nfsstat3::NFS3ERR_INVAL,
        BackendError::Stale => nfsstat3::NFS3ERR_STALE,
        BackendError::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        BackendError::ReadOnly => nfsstat3::NFS3ERR_ROFS,
        BackendError::NotSupported => nfsstat3::NFS3ERR_NOTSUPP,
        BackendError::BadCookie => nfsstat3::NFS3ERR_BAD_COOKIE,
        BackendError::TooBig => nfsstat3::NFS3ERR_FBIG,
        BackendError::NotSync => nfsstat3::NFS3ERR_NOT_SYNC,
        BackendError::Jukebox => nfsstat3::NFS3ERR_JUKEBOX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_common_errors() {
        assert_eq!(nfsstat(&BackendError::NotFound), nfsstat3::NFS3ERR_NOENT);
        assert_eq!(nfsstat(&BackendError::Stale), nfsstat3::NFS3ERR_STALE);
        assert_eq!(
            nfsstat(&BackendError::NotSupported),
            nfsstat3::NFS3ERR_NOTSUPP
        );
        let io = BackendError::Io(std::io::Error::other("disk"));
        assert_eq!(nfsstat(&io), nfsstat3::NFS3ERR_IO);
    }
}
