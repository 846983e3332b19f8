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
