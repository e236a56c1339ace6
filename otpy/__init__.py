"""otpy: Erlang/OTP behaviours for Python, stepped inline on one trio event loop.

Servers are classes with synchronous callbacks of explicit state; supervisors restart
them; releases upgrade them live. See README.md and docs/ for a tour.
"""

from ._client import Client as Client
from ._client import connect as connect
from ._endpoint import EndpointLimits as EndpointLimits
from ._exceptions import BadRequest as BadRequest
from ._exceptions import BadReturn as BadReturn
from ._exceptions import CallTimeout as CallTimeout
from ._exceptions import MailboxFull as MailboxFull
from ._exceptions import NoSuchServer as NoSuchServer
from ._exceptions import OtpyError as OtpyError
from ._exceptions import RemoteError as RemoteError
from ._exceptions import RestartIntensityExceeded as RestartIntensityExceeded
from ._exceptions import ServerCrashed as ServerCrashed
from ._exceptions import ServerStopped as ServerStopped
from ._exceptions import StartFailed as StartFailed
from ._exceptions import StateTypeError as StateTypeError
from ._exceptions import StepTimeout as StepTimeout
from ._exceptions import SupervisorError as SupervisorError
from ._exceptions import UpgradeFailed as UpgradeFailed
from ._exceptions import WouldBlock as WouldBlock
from ._node import Node as Node
from ._node import open_node as open_node
from ._node import run as run
from ._release import Down as Down
from ._release import Release as Release
from ._release import ReleaseInfo as ReleaseInfo
from ._release import Update as Update
from ._scheduler import TaskRef as TaskRef
from ._scheduler import TimerRef as TimerRef
from ._server import Caller as Caller
from ._server import GenServer as GenServer
from ._server import Ignore as Ignore
from ._server import NoReply as NoReply
from ._server import Reply as Reply
from ._server import Stop as Stop
from ._server import TaskDone as TaskDone
from ._server import TaskFailed as TaskFailed
from ._supervisor import Child as Child
from ._supervisor import ChildInfo as ChildInfo
from ._supervisor import Restart as Restart
from ._supervisor import Strategy as Strategy
from ._supervisor import Supervisor as Supervisor

__all__ = [
    "BadRequest",
    "BadReturn",
    "CallTimeout",
    "Caller",
    "Child",
    "ChildInfo",
    "Client",
    "Down",
    "EndpointLimits",
    "GenServer",
    "Ignore",
    "MailboxFull",
    "NoReply",
    "NoSuchServer",
    "Node",
    "OtpyError",
    "Release",
    "ReleaseInfo",
    "RemoteError",
    "Reply",
    "Restart",
    "RestartIntensityExceeded",
    "ServerCrashed",
    "ServerStopped",
    "StartFailed",
    "StateTypeError",
    "StepTimeout",
    "Stop",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "TaskDone",
    "TaskFailed",
    "TaskRef",
    "TimerRef",
    "Update",
    "UpgradeFailed",
    "WouldBlock",
    "connect",
    "open_node",
    "run",
]
