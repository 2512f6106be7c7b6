//! Raw PDUs against the target: the allow-list at login, malformed PDUs.
