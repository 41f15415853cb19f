"""How the gateway authenticates to each cloud, and the service behaviours around it:
Entra and Google tokens cached and refreshed before they expire, SigV4 from every source
of AWS credentials (and a Bedrock API key), Bedrock throttling retried, and Azure's
content filter surfaced in OpenAI's shape."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.clouds import Clouds, config, serve_clouds
from tests.harness import BackgroundLoop, Gateway, UpstreamServer
from tests.test_providers_through_gateway import ask, ledger_row
from tests.upstreams import ANSWER, bedrock_server, sts_server


@pytest.fixture
def clouds(bg: BackgroundLoop, tmp_path: Path) -> Iterator[Clouds]:
    yield from serve_clouds(bg, tmp_path)


def ask_until(gateway: Gateway, model: str, done: Callable[[], bool], limit: float) -> int:
    """Ask `model` one request after another until `done()` (or `limit` seconds); every
    answer must succeed. Returns how many were asked."""
    client = gateway.client()
    asked = 0
    deadline = time.monotonic() + limit
    while not done() and time.monotonic() < deadline:
        reply = client.chat.completions.create(model=model, messages=ask("Hello"))
        assert reply.choices[0].message.content == ANSWER
        asked += 1
        time.sleep(0.05)
    return asked


def test_entra_token_is_fetched_once_and_reused(
    gateway_factory: Callable[..., Gateway], clouds: Clouds
) -> None:
    gateway = gateway_factory(config(clouds))
    for _ in range(5):
        gateway.client().chat.completions.create(model="azure-entra", messages=ask("Hi"))
    state = clouds.azure_state
    assert state.grants == 1
    assert len(set(state.bearers)) == 1 and state.bearers[0] in state.tokens


@pytest.mark.parametrize("server", ["azure", "vertex"])
def test_tokens_are_refreshed_before_they_expire(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, server: str
) -> None:
    """Tokens that live 3 s: requests keep succeeding across several token lifetimes,
    each on a token that had not expired (the fakes reject expired ones with a 401)."""
    state: Any = clouds.azure_state if server == "azure" else clouds.vertex_state
    state.lifetime = 3
    gateway = gateway_factory(config(clouds))
    model = "azure-entra" if server == "azure" else "vertex-gemini"
    asked = ask_until(gateway, model, lambda: state.grants >= 3, 20)
    assert state.grants >= 3 and asked > state.grants
    assert len(set(state.bearers)) >= 2  # the last token may still be waiting for its turn


def test_entra_refusal_names_the_credentials(
    gateway_factory: Callable[..., Gateway], clouds: Clouds
) -> None:
    settings = config(clouds)
    settings["providers"]["azure-entra"]["azure"]["client_secret"] = "not-the-secret-0123456789"
    gateway = gateway_factory(settings)
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.client().chat.completions.create(model="azure-entra", messages=ask("Hi"))
    assert raised.value.status_code == 502
    assert "AADSTS7000215" in raised.value.message and "client_secret" in raised.value.message
    assert "not-the-secret" not in raised.value.response.text


def bedrock_only(clouds: Clouds, **settings: Any) -> dict[str, Any]:
    full = config(clouds)
    full["providers"]["bedrock"]["bedrock"] = {"region": bedrock_server.REGION, **settings}
    return full


def test_bedrock_credentials_from_the_environment(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard chain: temporary credentials (with a session token) from env vars."""
    clouds.bedrock_state.credentials["ASIAFAKETEMPORARY001"] = ("temp/secret", "session-token-x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAFAKETEMPORARY001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temp/secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-x")
    gateway = gateway_factory(bedrock_only(clouds))
    reply = gateway.client().chat.completions.create(model="bedrock", messages=ask("Hi"))
    assert reply.choices[0].message.content == ANSWER
    sent = clouds.recorder("bedrock").last.headers
    assert sent["x-amz-security-token"] == "session-token-x"
    assert "Credential=ASIAFAKETEMPORARY001/" in sent["authorization"]


def test_bedrock_credentials_from_a_profile(
    gateway_factory: Callable[..., Gateway],
    clouds: Clouds,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    shared = tmp_path / "credentials"
    shared.write_text(
        "[default]\naws_access_key_id = AKIAWRONGDEFAULT0001\naws_secret_access_key = nope\n"
        f"[bedrock-gw]\naws_access_key_id = {bedrock_server.ACCESS_KEY}\n"
        f"aws_secret_access_key = {bedrock_server.SECRET_KEY}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    gateway = gateway_factory(bedrock_only(clouds, profile="bedrock-gw"))
    reply = gateway.client().chat.completions.create(model="bedrock", messages=ask("Hi"))
    assert reply.choices[0].message.content == ANSWER
    assert clouds.bedrock_state.signatures_checked >= 1


def test_bedrock_api_key_is_a_bearer(
    gateway_factory: Callable[..., Gateway], clouds: Clouds
) -> None:
    settings = bedrock_only(clouds)
    settings["providers"]["bedrock"]["api_key"] = bedrock_server.API_KEY
    gateway = gateway_factory(settings)
    reply = gateway.client().chat.completions.create(model="bedrock", messages=ask("Hi"))
    assert reply.choices[0].message.content == ANSWER
    sent = clouds.recorder("bedrock").last.headers
    assert sent["authorization"] == f"Bearer {bedrock_server.API_KEY}"
    assert "x-amz-date" not in sent


@pytest.mark.parametrize("stream", [False, True])
def test_bedrock_throttling_is_retried(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, stream: bool
) -> None:
    settings = config(clouds)
    settings["models"]["bedrock"]["retry"] = {"max_retries": 2, "backoff_base": 0.01}
    gateway = gateway_factory(settings)
    clouds.bedrock_state.throttle = 2
    reply: Any = gateway.client().chat.completions.create(
        model="bedrock", messages=ask("Hi"), stream=stream
    )
    text = (
        "".join(c.choices[0].delta.content or "" for c in reply)
        if stream
        else reply.choices[0].message.content
    )
    assert text == ANSWER
    row = ledger_row(gateway, "1=1")
    assert (row["outcome"], row["attempts"]) == ("success", 3)
    throttled = gateway.metric(
        "metergate_upstream_attempts_total", upstream="bedrock-up", outcome="rate_limited"
    )
    assert throttled == 2


def test_bedrock_persistent_throttling_is_a_429(
    gateway_factory: Callable[..., Gateway], clouds: Clouds
) -> None:
    gateway = gateway_factory(config(clouds))
    clouds.bedrock_state.throttle = 5
    with pytest.raises(openai.RateLimitError) as raised:
        gateway.client().chat.completions.create(model="bedrock", messages=ask("Hi"))
    assert "ThrottlingException" in raised.value.message
    assert ledger_row(gateway, "1=1")["outcome"] == "upstream_rejected"  # the provider's 429


def test_azure_filtered_prompt_is_a_final_400(
    gateway_factory: Callable[..., Gateway], clouds: Clouds
) -> None:
    """Not retried, not sent to a fallback: the caller gets Azure's verdict in OpenAI's
    shape, with the filter results."""
    settings = config(clouds)
    settings["models"]["azure"]["retry"] = {"max_retries": 2}
    settings["models"]["azure"]["fallbacks"] = ["bedrock"]
    gateway = gateway_factory(settings)
    with pytest.raises(openai.BadRequestError) as raised:
        gateway.client().chat.completions.create(
            model="azure", messages=ask("TRIGGER:content_filter_prompt")
        )
    error = raised.value.response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "content_filter",
        "prompt",
        "invalid_request_error",
    )
    assert "content management policy" in error["message"]
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True
    row = ledger_row(gateway, "1=1")
    assert (row["outcome"], row["status"], row["attempts"]) == ("upstream_rejected", 400, 1)
    assert clouds.recorder("bedrock").requests == []


@pytest.mark.parametrize("stream", [False, True])
def test_azure_filtered_answer_keeps_its_finish_reason(
    gateway_factory: Callable[..., Gateway], clouds: Clouds, stream: bool
) -> None:
    gateway = gateway_factory(config(clouds))
    reply: Any = gateway.client().chat.completions.create(
        model="azure", messages=ask("TRIGGER:content_filter_output"), stream=stream
    )
    if stream:
        chunks = list(reply)
        assert all(chunk.choices for chunk in chunks), "the prompt-filter chunk is dropped"
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        reasons, text = [reply.choices[0].finish_reason], reply.choices[0].message.content
    assert reasons == ["content_filter"] and text == "The quick"
    row = ledger_row(gateway, "1=1")
    assert (row["outcome"], row["output_tokens"]) == ("success", 2)


def test_azure_unknown_deployment_is_the_gateways_problem(
    gateway_factory: Callable[..., Gateway], clouds: Clouds
) -> None:
    settings = config(clouds)
    settings["providers"]["azure"]["azure"]["deployments"]["gpt-4.1"] = "deleted-deployment"
    gateway = gateway_factory(settings)
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.client().chat.completions.create(model="azure", messages=ask("Hi"))
    assert raised.value.status_code == 502 and "does not exist" in raised.value.message


def test_bedrock_credentials_from_a_web_identity_are_refreshed(
    gateway_factory: Callable[..., Gateway],
    clouds: Clouds,
    bg: BackgroundLoop,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The chain's web-identity step (as on EKS): role credentials from STS that live
    4 s are replaced before they expire, and every request verifies."""
    state = sts_server.State(clouds.bedrock_state, lifetime=4)
    sts = UpstreamServer(bg, sts_server.create_app(state))
    token_file = tmp_path / "web-identity-token"
    token_file.write_text(sts_server.TOKEN)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ROLE_ARN", sts_server.ROLE)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
    monkeypatch.setenv("AWS_REGION", bedrock_server.REGION)
    try:
        gateway = gateway_factory(bedrock_only(clouds))
        asked = ask_until(gateway, "bedrock", lambda: state.issued >= 3, 20)
    finally:
        sts.close()
    assert state.issued >= 3 and asked > state.issued
    keys = {r.headers["authorization"].split("/")[0] for r in clouds.recorder("bedrock").requests}
    assert len(keys) >= 2 and all("ASIAFAKEWEBIDENTITY" in key for key in keys)


@pytest.mark.parametrize("source", ["config", "environment"])
def test_bedrock_keys_echoed_by_the_upstream_do_not_reach_the_caller(
    gateway_factory: Callable[..., Gateway],
    clouds: Clouds,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    """An upstream (or a proxy before it) that quotes the request's signing headers and
    secret in its error: the caller reads the message without the AWS keys, whether
    they came from the config or were fetched from the environment's chain (a role's
    session token travels with every request)."""
    if source == "config":
        access, secret, token = bedrock_server.ACCESS_KEY, bedrock_server.SECRET_KEY, None
        settings = bedrock_only(clouds, access_key_id=access, secret_access_key=secret)
    else:
        access, secret, token = "ASIAFAKETEMPORARY002", "temp/secret/two", "session-token-two"
        clouds.bedrock_state.credentials[access] = (secret, token)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)
        settings = bedrock_only(clouds)
    gateway = gateway_factory(settings)
    client = gateway.client()
    messages = []
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="bedrock", messages=ask("TRIGGER:echo_credentials"))
    messages.append(refused.value.response.text)
    with pytest.raises(openai.APIError) as broken:  # (before or after its first chunk)
        list(
            client.chat.completions.create(
                model="bedrock", messages=ask("TRIGGER:stream_echo_credentials"), stream=True
            )
        )
    messages.append(str(broken.value.message))
    for message in messages:
        assert "request rejected" in message and "***" in message, message
        for leaked in (access, secret, token):
            assert leaked is None or leaked not in message, message
