"""The audit log: who did what, when, from where, and how it ended.

Inside an RPC handler, `note(action, resource=..., resource_tenant=...)`
marks the call for the log (written when the call ends, with its status
and the caller's identity and address). Outside a call, use
`AuditRecorder.record`. Actions are named in `actions`.
"""

from flowport.server.audit import actions
from flowport.server.audit.calls import CallAuditor, note
from flowport.server.audit.recorder import AuditRecorder

__all__ = ["AuditRecorder", "CallAuditor", "actions", "note"]
