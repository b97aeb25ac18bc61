"""Domains: the registry of VMs and their lifecycle (local world or Qubes)."""

from ._admin import COMMUNICATION_ERROR as COMMUNICATION_ERROR
from ._admin import PROTOCOL_ERROR as PROTOCOL_ERROR
from ._admin import AdminProtocolError as AdminProtocolError
from ._admin import AdminRequest as AdminRequest
from ._admin import ListEntry as ListEntry
from ._admin import PropertyValue as PropertyValue
from ._admin import decode_property as decode_property
from ._admin import decode_reply as decode_reply
from ._admin import decode_request as decode_request
from ._admin import decode_tags as decode_tags
from ._admin import decode_vm_list as decode_vm_list
from ._admin import encode_property as encode_property
from ._admin import encode_reply_error as encode_reply_error
from ._admin import encode_reply_ok as encode_reply_ok
from ._admin import encode_request as encode_request
from ._admin import encode_tags as encode_tags
from ._admin import encode_vm_list as encode_vm_list
from ._admin_server import AdminCallRefused as AdminCallRefused
from ._admin_server import AdminMethod as AdminMethod
from ._admin_server import serve_admin as serve_admin
from ._disposable import disposable as disposable
from ._interface import Domain as Domain
from ._interface import Domains as Domains
from ._interface import DomainsError as DomainsError
from ._qubesd import DEFAULT_QUBESD_SOCKET as DEFAULT_QUBESD_SOCKET
from ._qubesd import QubesdDomains as QubesdDomains
