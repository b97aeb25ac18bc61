"""The qrexec policy engine: parsers for both policy formats, one evaluator.

Sans-IO apart from reading policy files. Typical use::

    cache = PolicyCache(r2_dir, policy_d)
    decision = cache.evaluate(Request.from_call(src, target, "svc+arg"), system_info)
    decision = resolve_ask(decision, assume_yes=False, prompt=program_prompt([prog]))
    print(format_response(decision), end="")
"""

from ._ask import ASK_SERVICE as ASK_SERVICE
from ._ask import DEFAULT_ASK_TIMEOUT as DEFAULT_ASK_TIMEOUT
from ._ask import MAX_AGENT_ANSWER as MAX_AGENT_ANSWER
from ._ask import NOTIFY_SERVICE as NOTIFY_SERVICE
from ._ask import AgentAnswer as AgentAnswer
from ._ask import Prompt as Prompt
from ._ask import Question as Question
from ._ask import agent_domain as agent_domain
from ._ask import agent_icons as agent_icons
from ._ask import apply_agent_answer as apply_agent_answer
from ._ask import ask_program as ask_program
from ._ask import ask_request as ask_request
from ._ask import encode_request as encode_request
from ._ask import failure_notice as failure_notice
from ._ask import notify_request as notify_request
from ._ask import parse_agent_answer as parse_agent_answer
from ._ask import program_prompt as program_prompt
from ._ask import resolve_ask as resolve_ask
from ._ask import unanswered as unanswered
from ._cache import DEFAULT_POLICY_D as DEFAULT_POLICY_D
from ._cache import DEFAULT_R2_DIR as DEFAULT_R2_DIR
from ._cache import PolicyCache as PolicyCache
from ._cache import load_policy as load_policy
from ._engine import Decision as Decision
from ._engine import Policy as Policy
from ._engine import Request as Request
from ._engine import deny as deny
from ._engine import evaluate as evaluate
from ._errors import PolicySyntaxError as PolicySyntaxError
from ._multifile import parse_multifile_text as parse_multifile_text
from ._names import is_request_id as is_request_id
from ._r2 import parse_r2_text as parse_r2_text
from ._response import MalformedResponse as MalformedResponse
from ._response import Verdict as Verdict
from ._response import format_response as format_response
from ._response import parse_response as parse_response
from ._rules import Action as Action
from ._rules import Location as Location
from ._rules import Rule as Rule
from ._system_info import DomainInfo as DomainInfo
from ._system_info import SystemInfo as SystemInfo
from ._system_info import SystemInfoError as SystemInfoError
from ._system_info import load_system_info as load_system_info
from ._system_info import minimal_system_info as minimal_system_info
from ._system_info import system_info_from_json as system_info_from_json
