// The admin API client. The admin key lives in this tab's sessionStorage only and goes
// out as a Bearer header; no cookies, so no request can be forged from another site.
const STORE = "metergate.adminKey";

export class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

export const adminKey = () => sessionStorage.getItem(STORE);
export const keepKey = (key) => sessionStorage.setItem(STORE, key);
export const forgetKey = () => sessionStorage.removeItem(STORE);

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error.message || message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, response.headers.get("retry-after"));
}

/** Call the admin API; resolves to the parsed JSON (or the Response when `raw`). */
export async function api(path, { method = "GET", body, raw = false, key } = {}) {
  const headers = { Authorization: `Bearer ${key ?? adminKey() ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
  });
  if (!response.ok) throw await failure(response);
  return raw ? response : response.json();
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
