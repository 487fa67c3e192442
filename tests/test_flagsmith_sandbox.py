"""The emulated Flagsmith answers as the fact sheet says a real server does (apis/flagsmith.md)."""

from __future__ import annotations

import httpx
import loopback
import pytest

from mixsync.http import tls_context


@pytest.fixture
def api(sandbox):
    state = sandbox.flagsmith
    with httpx.Client(verify=tls_context(), base_url=sandbox.url("flagsmith") + "/api/v1/",
                      headers={"X-Environment-Key": state.server_key}) as client:
        yield client, state


def post(client, identifier, traits):
    return client.post("identities/", json={"identifier": identifier, "traits": traits})


def test_wrong_or_missing_key_is_403(sandbox):
    url = sandbox.url("flagsmith") + "/api/v1/identities/"
    for headers in ({"X-Environment-Key": "ser.wrong"}, {}):
        response = loopback.post(url, json={"identifier": "a", "traits": []}, headers=headers)
        assert response.status_code == 403
        assert response.json() == {"detail": "Invalid or missing Environment Key"}


def test_merge_semantics_null_deletes_and_200(api):
    client, state = api
    first = post(client, "u-1", [{"trait_key": "a", "trait_value": True}, {"trait_key": "b", "trait_value": "x"}])
    assert first.status_code == 200
    post(client, "u-1", [{"trait_key": "c", "trait_value": 3}])
    assert state.traits("u-1") == {"a": True, "b": "x", "c": 3}
    deleted = post(client, "u-1", [{"trait_key": "a", "trait_value": None}, {"trait_key": "b", "trait_value": 1.5}])
    assert {t["trait_key"]: t["trait_value"] for t in deleted.json()["traits"]} == {"b": 1.5, "c": 3}
    assert state.traits("u-1") == {"b": 1.5, "c": 3}


def test_empty_identifier_is_200_and_stores_nothing(api):
    client, state = api
    response = post(client, "", [{"trait_key": "a", "trait_value": True}])
    assert response.status_code == 200
    assert response.json()["traits"][0]["transient"] is True
    assert state.all_traits() == {}


def test_identifier_and_key_are_trimmed_and_case_sensitive(api):
    client, state = api
    post(client, "  User-1 ", [{"trait_key": " k ", "trait_value": True}])
    post(client, "user-1", [{"trait_key": "k", "trait_value": False}])
    assert state.traits("User-1") == {"k": True} and state.traits("user-1") == {"k": False}


def test_limits_answer_like_the_real_server(api):
    client, state = api
    assert post(client, "u", [{"trait_key": "n", "trait_value": 2**31}]).status_code == 500
    assert post(client, "u", [{"trait_key": "n", "trait_value": 2**31 - 1}]).status_code == 200
    assert post(client, "u", [{"trait_key": "s", "trait_value": "x" * 2001}]).status_code == 400
    assert post(client, "u", [{"trait_key": "k" * 201, "trait_value": 1}]).status_code == 400
    assert post(client, "x" * 2001, [{"trait_key": "a", "trait_value": 1}]).status_code == 500
    assert post(client, "u", [{"trait_key": "l", "trait_value": [1, 2]}]).status_code == 200
    assert state.traits("u")["l"] == "[1, 2]"  # lists are stored as their Python repr


def test_duplicate_keys_500_for_a_new_identity_first_value_for_an_existing_one(api):
    client, state = api
    dup = [{"trait_key": "k", "trait_value": 1}, {"trait_key": "k", "trait_value": 2}]
    assert post(client, "new", dup).status_code == 500
    assert "new" in state.all_traits() and state.traits("new") == {}  # not atomic: the identity was created
    assert post(client, "new", dup).status_code == 200
    assert state.traits("new") == {"k": 1}


def test_transient_traits_are_not_stored(api):
    client, state = api
    post(client, "u", [{"trait_key": "t", "trait_value": 1, "transient": True}, {"trait_key": "p", "trait_value": 2}])
    assert state.traits("u") == {"p": 2}


def test_core_bulk_put_only_and_null_deletes(api):
    client, state = api
    items = [{"identity": {"identifier": "a"}, "trait_key": "x", "trait_value": True},
             {"identity": {"identifier": "b"}, "trait_key": "x", "trait_value": False}]
    assert client.put("traits/bulk/", json=items).status_code == 200
    assert client.post("traits/bulk/", json=items).status_code == 405
    assert client.put("traits/bulk/", json=[{"identity": {"identifier": "a"}, "trait_key": "x",
                                             "trait_value": None}]).status_code == 200
    assert state.traits("a") == {} and state.traits("b") == {"x": False}
    assert client.put("bulk-identities/", json={"data": []}).status_code == 404  # core has no Edge bulk route


def test_edge_bulk_202_limit_and_partial_application(api):
    client, state = api
    state.api = "edge"
    data = [{"identifier": f"e{i}", "traits": [{"trait_key": "k", "trait_value": True}]} for i in range(4)]
    assert client.put("bulk-identities/", json={"data": data}).status_code == 202
    assert all(state.traits(f"e{i}") == {"k": True} for i in range(4))
    too_many = [{"identifier": f"e{i}", "traits": []} for i in range(101)]
    assert client.put("bulk-identities/", json={"data": too_many}).status_code == 400
    state.faults.add("bulk_identities_partial")
    more = [{"identifier": f"p{i}", "traits": [{"trait_key": "k", "trait_value": True}]} for i in range(4)]
    assert client.put("bulk-identities/", json={"data": more}).status_code == 202  # "accepted", yet…
    assert [state.traits(f"p{i}") for i in range(4)] == [{"k": True}, {"k": True}, {}, {}]
    # POST overwrites every trait of the identity.
    client.post("bulk-identities/", json={"data": [{"identifier": "e0", "traits": [{"trait_key": "z",
                                                                                    "trait_value": 1}]}]})
    assert state.traits("e0") == {"z": 1}


def test_read_back_returns_the_traits(api):
    client, _state = api
    post(client, "r", [{"trait_key": "a", "trait_value": True}])
    body = client.get("identities/", params={"identifier": "r"}).json()
    assert body["identifier"] == "r"
    assert [(t["trait_key"], t["trait_value"]) for t in body["traits"]] == [("a", True)]


def test_client_key_trait_writes_follow_allow_client_traits(api, sandbox):
    _client, state = api
    url = sandbox.url("flagsmith") + "/api/v1/"
    headers = {"X-Environment-Key": state.client_key}
    body = {"identifier": "c", "traits": [{"trait_key": "a", "trait_value": True}]}
    assert state.allow_client_traits is True  # Flagsmith's default: client keys may write traits
    assert loopback.post(url + "identities/", json=body, headers=headers).status_code == 200
    assert state.traits("c") == {"a": True}
    state.allow_client_traits = False
    body["traits"][0]["trait_value"] = False
    assert loopback.post(url + "identities/", json=body, headers=headers).status_code == 200  # dropped silently
    assert state.traits("c") == {"a": True}
    bulk = [{"identity": {"identifier": "c"}, "trait_key": "a", "trait_value": None}]
    assert loopback.put(url + "traits/bulk/", json=bulk, headers=headers).status_code == 400
    assert state.traits("c") == {"a": True}


def test_identity_level_transient_stores_nothing(api):
    client, state = api
    post(client, "t", [{"trait_key": "kept", "trait_value": 1}])
    response = client.post("identities/", json={"identifier": "t", "transient": True,
                                                "traits": [{"trait_key": "new", "trait_value": 2}]})
    assert response.status_code == 200
    assert {t["trait_key"] for t in response.json()["traits"]} == {"kept", "new"}
    assert state.traits("t") == {"kept": 1}
    client.post("identities/", json={"identifier": "ghost", "transient": True, "traits": []})
    assert "ghost" not in state.all_traits()


def test_bulk_identities_wrong_key_on_core_is_404(sandbox):
    url = sandbox.url("flagsmith") + "/api/v1/bulk-identities/"
    assert loopback.put(url, json={"data": []}, headers={"X-Environment-Key": "ser.wrong"}).status_code == 404
    sandbox.flagsmith.api = "edge"
    assert loopback.put(url, json={"data": []}, headers={"X-Environment-Key": "ser.wrong"}).status_code == 403


def test_core_bulk_over_long_key_is_500_after_the_deletes(api):
    client, state = api
    post(client, "d", [{"trait_key": "gone", "trait_value": 1}, {"trait_key": "stays", "trait_value": 2}])
    items = [{"identity": {"identifier": "d"}, "trait_key": "gone", "trait_value": None},
             {"identity": {"identifier": "d"}, "trait_key": "k" * 201, "trait_value": 1},
             {"identity": {"identifier": "e"}, "trait_key": "x", "trait_value": 1}]
    assert client.put("traits/bulk/", json=items).status_code == 500
    assert state.traits("d") == {"stays": 2}  # the delete of the same request was applied
    assert client.put("traits/bulk/", json=items).status_code == 500  # a retry is harmless


def test_core_bulk_null_for_unknown_identity_creates_nothing_and_echo_is_non_null_only(api):
    client, state = api
    response = client.put("traits/bulk/", json=[{"identity": {"identifier": "nobody"}, "trait_key": "k",
                                                 "trait_value": None}])
    assert response.status_code == 200 and response.json() == []
    assert "nobody" not in state.all_traits()
    mixed = [{"identity": {"identifier": "m"}, "trait_key": "a", "trait_value": 1},
             {"identity": {"identifier": "m"}, "trait_key": "b", "trait_value": None}]
    assert client.put("traits/bulk/", json=mixed).json() == [
        {"identity": {"identifier": "m"}, "trait_value": 1, "trait_key": "a"}]


def test_core_bulk_identifiers_are_not_trimmed_for_deletes_and_integers_are_stringified(api):
    client, state = api
    post(client, "p6", [{"trait_key": "k", "trait_value": 1}])
    client.put("traits/bulk/", json=[{"identity": {"identifier": " p6 "}, "trait_key": "k", "trait_value": None}])
    assert state.traits("p6") == {"k": 1}
    assert client.put("traits/bulk/", json=[{"identity": {"identifier": 42}, "trait_key": "n",
                                             "trait_value": 1}]).status_code == 200
    assert state.traits("42") == {"n": 1}
    assert post(client, 7, [{"trait_key": "n", "trait_value": 2}]).json()["identifier"] == "7"
    assert state.traits("7") == {"n": 2}


def test_core_bulk_blank_identifier_is_a_field_error(api):
    client, _state = api
    response = client.put("traits/bulk/", json=[{"identity": {"identifier": ""}, "trait_key": "k",
                                                 "trait_value": 1}])
    assert response.status_code == 400
    assert response.json() == [{"identity": {"identifier": ["This field may not be blank."]}}]


def test_get_identity_with_empty_identifier_is_200_missing_identifier(api):
    client, _state = api
    response = client.get("identities/", params={"identifier": ""})
    assert response.status_code == 200 and response.json() == {"detail": "Missing identifier"}


def test_identity_flags_apply_overrides_and_keep_value_types(api):
    client, state = api
    state.add_feature("on_plain", enabled=True)
    state.add_feature("zero", enabled=True, value=0)
    state.add_feature("off", enabled=False, value="x")
    state.override("vip", "off", True, False)
    flags = {f["feature"]["name"]: (f["enabled"], f["feature_state_value"])
             for f in client.get("identities/", params={"identifier": "vip"}).json()["flags"]}
    assert flags == {"on_plain": (True, None), "zero": (True, 0), "off": (True, False)}
    environment = {f["feature"]["name"]: (f["enabled"], f["feature_state_value"]) for f in client.get("flags/").json()}
    assert environment["off"] == (False, "x")
