"""`create_app()`: the Litestar application (granian's factory target)."""

from __future__ import annotations

# First, before the imports that take seconds (torch): a stop signal granian's worker receives
# while importing is remembered, not lost (app/early_signals.py).
import app.early_signals  # noqa: F401

# isort: split

import logging
import os

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig

from app.access_log import RefusalSampler, access_log, unrouted_logger
from app.auth import BEARER_COMPONENTS
from app.errors import EXCEPTION_HANDLERS
from app.http_limits import BodyReads, body_timeout
from app.lifespan import serve_model
from app.log_format import Redactor, formatter
from app.media import ImageFetchPolicy
from app.metrics import Metrics
from app.routes.chat import chat_completions
from app.routes.completions import completions
from app.routes.docs import (
    JSON_SCHEMA,
    REDOC,
    SCHEMA_PATH,
    SWAGGER,
    document_streams,
    openapi_json,
    redoc_ui,
    schema_router,
    swagger_ui,
)
from app.routes.generate import generate
from app.routes.health import health, live, metrics, version
from app.routes.models import list_models, retrieve_model
from app.routes.responses import create_response
from app.routes.templates import apply_template
from app.routes.tokenize import detokenize, tokenize
from app.services import Services
from app.settings import Settings
from app.translate import Translator
from app.version import VERSION

ROUTES = [
    chat_completions,
    completions,
    create_response,
    generate,
    apply_template,
    tokenize,
    detokenize,
    list_models,
    retrieve_model,
    health,
    live,
    metrics,
    version,
    swagger_ui,
    redoc_ui,
    openapi_json,
]


def configure_logging(settings: Settings) -> None:
    level = (
        logging.DEBUG
        if settings.log_level in ("debug", "trace")
        else getattr(logging, settings.log_level.upper())
    )
    logging.basicConfig(level=level, force=True)
    redactor = Redactor(source_secrets(settings)) if settings.redact_source else None
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(settings.log_format))
        if redactor is not None:
            handler.addFilter(redactor)
    # transformers and huggingface_hub each put a stderr handler of their own on their loggers:
    # their records (a hub download's retry warning names the repo and revision) were printed
    # unredacted and as plain text in a LOG_FORMAT=json log, and the hub's twice (its handler,
    # then the root's). They go through the process's handlers only.
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    hub_root = logging.getLogger("huggingface_hub")
    for own in list(hub_root.handlers):
        hub_root.removeHandler(own)
    hub_root.propagate = True
    if not settings.debug:
        for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    else:
        # The spec's DEBUG: transformers and huggingface_hub at debug level (set here, not by
        # TRANSFORMERS_VERBOSITY, which made transformers print its import-time lines with its
        # own handler).
        transformers_logging.set_verbosity_debug()
        hub_logging.set_verbosity_debug()
    # The seed keeps per-request lines off by default (PROGRESS_LOGS=0, for latency); a request the
    # server failed (5xx) or turned away for load (503) is logged whatever it says.
    requests_log = logging.getLogger("docoserve.requests")
    requests_log.setLevel(logging.INFO if settings.progress_logs else logging.WARNING)
    for sampler in [f for f in requests_log.filters if isinstance(f, RefusalSampler)]:
        requests_log.removeFilter(sampler)
    if not settings.progress_logs:
        requests_log.addFilter(RefusalSampler())


def source_secrets(settings: Settings) -> list[str]:
    """What REDACT_SOURCE keeps out of the log: the model source as given and as a path, its hub
    cache folder name, the revision and the cache directory."""
    source = settings.model_path
    if source.startswith("builtin:"):
        return []
    return [
        source,
        os.path.abspath(os.path.expanduser(source)),
        "models--" + source.replace("/", "--"),
        # A short revision ("main", "v1") is a word that would be cut out of unrelated lines.
        settings.model_revision if settings.model_revision and len(settings.model_revision) >= 7 else "",
        settings.cache_dir,
    ]


def image_policy(settings: Settings) -> ImageFetchPolicy:
    return ImageFetchPolicy(
        allow_remote=settings.allow_remote_images,
        allowed_hosts=settings.image_url_allowed_hosts,
        allow_private=settings.allow_private_image_urls,
        allowed_private_networks=settings.image_url_allowed_networks,
        max_bytes=settings.max_image_bytes,
        timeout_s=settings.image_fetch_timeout_s,
    )


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    configure_logging(settings)
    holder: dict[str, Services] = {}
    metrics_registry = Metrics(
        lambda: holder["services"].scheduler if "services" in holder else None, settings.model_name
    )
    services = Services(
        settings=settings,
        translator=Translator(settings, image_policy(settings), None),
        metrics=metrics_registry,
    )
    holder["services"] = services
    body_reads = BodyReads()  # stopped by the lifespan's SIGTERM drain: uploads still arriving end
    cors = None
    if settings.cors_allow_origins:
        # Browser clients send the key as a bearer token: allow the header, never cookies. Any
        # header an allowed origin asks for is allowed (the preflight names them back, so that
        # Authorization is covered, which a bare `*` is not): the OpenAI and Anthropic JS SDKs add
        # X-Stainless-* headers to every request, and a fixed list refused their preflight.
        cors = CORSConfig(
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["GET", "POST", "HEAD", "OPTIONS"],
            allow_headers=["*"],
            # Streams say their warnings (a lowered max_tokens, an ignored field) only in a header.
            expose_headers=["X-Request-Id", "Retry-After", "X-Request-Warnings"],
            allow_credentials=False,
        )
    app = Litestar(
        route_handlers=ROUTES,
        cors_config=cors,
        # Logging is configured once, by configure_logging (Litestar's own config would replace
        # the root handler with its format at startup).
        logging_config=None,
        middleware=[
            access_log(metrics_registry.count_http),
            body_timeout(settings.http_body_timeout_s, body_reads),
        ],
        before_send=[unrouted_logger(metrics_registry.count_http)],
        lifespan=[serve_model],
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(
            title=f"{settings.model_name} - Docomentsio",
            version=VERSION,
            description="OpenAI-compatible text and vision-language inference server.",
            components=BEARER_COMPONENTS,
            path=SCHEMA_PATH,
            render_plugins=[SWAGGER, REDOC, JSON_SCHEMA],
            openapi_router=schema_router(),
        ),
        request_max_body_size=settings.max_request_body_bytes,
        debug=False,
    )
    app.state.services = services
    app.state.body_reads = body_reads
    app.state.api_key_bytes = settings.api_key.encode() if settings.api_key else None
    app.state.metrics_public = settings.metrics_public
    document_streams(app)
    return app
