"""otpy: Erlang/OTP behaviours for Python, stepped inline on one trio event loop.

Servers are classes with synchronous callbacks of explicit state; supervisors restart
them; releases upgrade them live. See README.md and docs/ for a tour.
"""

from ._client import Client as Client
from ._client import connect as connect
from ._core.monitors import MonitorRef as MonitorRef
from ._core.monitors import ServerDown as ServerDown
from ._core.names import Pid as Pid
from ._core.release import Down as Down
from ._core.release import Release as Release
from ._core.release import ReleaseInfo as ReleaseInfo
from ._core.release import Update as Update
from ._core.scheduler import TaskRef as TaskRef
from ._core.server import Caller as Caller
from ._core.server import Continue as Continue
from ._core.server import GenServer as GenServer
from ._core.server import Ignore as Ignore
from ._core.server import NoReply as NoReply
from ._core.server import Reply as Reply
from ._core.server import Stop as Stop
from ._core.server import TaskDone as TaskDone
from ._core.server import TaskFailed as TaskFailed
from ._core.supervisor import Child as Child
from ._core.supervisor import ChildInfo as ChildInfo
from ._core.supervisor import Restart as Restart
from ._core.supervisor import Strategy as Strategy
from ._core.supervisor import Supervisor as Supervisor
from ._core.timers import TimerRef as TimerRef
from ._exceptions import AuthFailed as AuthFailed
from ._exceptions import BadRequest as BadRequest
from ._exceptions import BadReturn as BadReturn
from ._exceptions import CallTimeout as CallTimeout
from ._exceptions import ConnectionLost as ConnectionLost
from ._exceptions import CookieError as CookieError
from ._exceptions import FrameTooLarge as FrameTooLarge
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
from ._exceptions import StoreError as StoreError
from ._exceptions import SupervisorError as SupervisorError
from ._exceptions import UpgradeFailed as UpgradeFailed
from ._exceptions import WouldBlock as WouldBlock
from ._node import Node as Node
from ._open import open_node as open_node
from ._open import run as run
from ._serve.limits import EndpointLimits as EndpointLimits
from ._serve.limits import HttpLimits as HttpLimits
from ._store import SqliteStore as SqliteStore
from ._store import Store as Store
from ._store import StoredState as StoredState

__all__ = [
    "AuthFailed",
    "BadRequest",
    "BadReturn",
    "CallTimeout",
    "Caller",
    "Child",
    "ChildInfo",
    "Client",
    "ConnectionLost",
    "Continue",
    "CookieError",
    "Down",
    "EndpointLimits",
    "FrameTooLarge",
    "GenServer",
    "HttpLimits",
    "Ignore",
    "MailboxFull",
    "MonitorRef",
    "NoReply",
    "NoSuchServer",
    "Node",
    "OtpyError",
    "Pid",
    "Release",
    "ReleaseInfo",
    "RemoteError",
    "Reply",
    "Restart",
    "RestartIntensityExceeded",
    "ServerCrashed",
    "ServerDown",
    "ServerStopped",
    "SqliteStore",
    "StartFailed",
    "StateTypeError",
    "StepTimeout",
    "Stop",
    "Store",
    "StoreError",
    "StoredState",
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
