"""Security: the development PKI (``dkv certs``); TLS credentials and RBAC come later."""

from dkv.security.certs import Issued, PkiLayout, issue_certificate, make_ca, write_dev_pki

__all__ = ["Issued", "PkiLayout", "issue_certificate", "make_ca", "write_dev_pki"]
