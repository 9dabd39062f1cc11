"""segment-topsort: declarative rules that turn Segment events into Topsort ad events.

>>> from engine import Engine
>>> engine = Engine.from_folders()               # bundled rules; pass folders to use your own
>>> outcome = engine.process(segment_event)      # pure and thread-safe
>>> outcome.emitted, outcome.rejected, outcome.skipped
"""

from .topsort.batching import MAX_PER_ARRAY, Batcher
from .engine import Engine
from .mapping import InProcessMapper, Mapped, MappedEvent, Mapper
from .errors import (
    ApiKeyError,
    AuthenticationError,
    ContentError,
    DeadLetterTopicError,
    DeliveryError,
    DeliveryStopped,
    EndpointError,
    EngineError,
    FieldError,
    InputError,
    KafkaSetupError,
    Problem,
    RequestRefused,
    RulesFolderError,
    RulesInvalid,
    ServeError,
    ServerStartError,
    SourceError,
    SourceRefused,
    SpoolError,
    SpoolFull,
    UnreachableError,
    YamlSyntaxError,
)
from .rules.loader import RuleSet, check_rules, load_rules
from .outcome import KINDS, Emitted, Kind, Outcome, Rejection
from .paths import BUNDLED_RULES
from .rules.rule import Rule

__all__ = [
    "ApiKeyError",
    "AuthenticationError",
    "BUNDLED_RULES",
    "Batcher",
    "ContentError",
    "DeadLetterTopicError",
    "DeliveryError",
    "DeliveryStopped",
    "Emitted",
    "EndpointError",
    "Engine",
    "EngineError",
    "FieldError",
    "InputError",
    "InProcessMapper",
    "KINDS",
    "KafkaSetupError",
    "Kind",
    "MAX_PER_ARRAY",
    "Mapped",
    "MappedEvent",
    "Mapper",
    "Outcome",
    "Problem",
    "Rejection",
    "RequestRefused",
    "Rule",
    "RuleSet",
    "RulesFolderError",
    "RulesInvalid",
    "ServeError",
    "ServerStartError",
    "SourceError",
    "SourceRefused",
    "SpoolError",
    "SpoolFull",
    "UnreachableError",
    "YamlSyntaxError",
    "check_rules",
    "load_rules",
]
