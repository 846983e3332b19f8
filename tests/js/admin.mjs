// The admin API as the test scripts call it: `api(method, path, body)` answers the parsed JSON.
export function adminApi(base, admin) {
  return async (method, path, body) => {
    const res = await fetch(base + path, {
      method,
      headers: { authorization: `Bearer ${admin}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return res.json();
  };
}

// The admin API with its status: `api(method, path, body)` answers `{status, body}`;
// `zone(overrides)` creates a zone (capacity 10, spawn and modify, some food) and answers it;
// `token(agent, zoneId, permissions)` mints a ten-minute join token.
export function adminClient(base, admin) {
  const api = async (method, path, body) => {
    const res = await fetch(base + path, {
      method,
      headers: { authorization: `Bearer ${admin}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  };
  const zone = async (overrides = {}) => {
    const { status, body } = await api("POST", "/api/zones", {
      name: "JS zone",
      capacity: 10,
      permissions: 0x03,
      resources: { food: { amount: 100, max: 100, regen: 1 } },
      ...overrides,
    });
    if (status !== 201) throw new Error(`zone not created: ${status} ${JSON.stringify(body)}`);
    return body;
  };
  const token = async (agent, zoneId, permissions = ["spawn_agents", "modify_zone"]) => {
    const { status, body } = await api("POST", "/api/tokens", {
      agent_id: agent,
      zone_id: zoneId,
      permissions,
      ttl_seconds: 600,
    });
    if (status !== 200) throw new Error(`token not minted: ${status} ${JSON.stringify(body)}`);
    return body.token;
  };
  return { api, zone, token };
}
