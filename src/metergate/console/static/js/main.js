// Console shell: sign-in, hash routing between pages, periodic refresh.
import { api, ApiError, adminKey, forgetKey, keepKey } from "./api.js";
import { h, replace } from "./dom.js";
import * as keys from "./pages/keys.js";
import * as mcp from "./pages/mcp.js";
import * as overview from "./pages/overview.js";
import * as request from "./pages/request.js";
import * as requests from "./pages/requests.js";
import * as rollouts from "./pages/rollouts.js";
import * as teams from "./pages/teams.js";
import * as upstreams from "./pages/upstreams.js";

const PAGES = { overview, upstreams, keys, teams, rollouts, mcp, requests, request };
const REFRESH_MS = 15_000;
// A page is asked again no sooner than this many times its last load after that load
// began: a report that takes 2 s over a big ledger is refreshed every 30 s, not every
// 15 s, so an open console keeps the gateway's reports to a tenth of its time.
const LOAD_SHARE = 10;
const $ = (id) => document.getElementById(id);

let session = null;
let renderSeq = 0;

function currentPage() {
  const name = location.hash.replace(/^#\/?/, "").split("?")[0];
  return PAGES[name] ? name : "overview";
}

function showSignIn(message = "") {
  session = null;
  $("nav").hidden = true;
  $("session").hidden = true;
  $("page").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("admin-key").focus();
}

/** A page failed: a refused key ends the session; anything else shows in the page. */
function pageError(error, root) {
  if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
    forgetKey();
    showSignIn(`Signed out: ${error.message}`);
    return;
  }
  replace(root, h("div", { class: "panel error", role: "alert", text: `Could not load: ${error.message}` }));
}

async function render() {
  if (!session) return;
  const name = currentPage();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const root = $("page");
  const seq = ++renderSeq;
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · metergate console`;
  try {
    await PAGES[name].render(root, { rerender: render, isCurrent: () => seq === renderSeq });
    root.dataset.page = name;
    root.dataset.loaded = String(seq);
  } catch (error) {
    if (seq === renderSeq) pageError(error, root);
  }
}

function showApp(info) {
  session = info;
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("session").hidden = false;
  $("page").hidden = false;
  $("gateway-info").textContent = `v${info.gateway_version} · config ${info.config_version.slice(0, 8)}`;
  render();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("admin-key");
  const key = input.value.trim();
  if (!key) {
    $("sign-in-error").textContent = "Enter the admin key.";
    return;
  }
  $("sign-in-button").disabled = true;
  try {
    const info = await api("/admin/api/session", { key });
    keepKey(key);
    input.value = "";
    showApp(info);
  } catch (error) {
    let message = error.message;
    if (error.status === 429 && error.retryAfter) message += ` (wait ${error.retryAfter}s)`;
    $("sign-in-error").textContent = message;
  } finally {
    $("sign-in-button").disabled = false;
  }
}

function refreshLoop() {
  let refreshing = false; // a page slower than REFRESH_MS (a long window over a big ledger) is not asked again meanwhile
  let notBefore = 0; // when the last load allows the next (LOAD_SHARE)
  setInterval(async () => {
    const page = PAGES[currentPage()];
    if (!session || !page.autoRefresh || document.hidden || refreshing || Date.now() < notBefore) return;
    if (document.querySelector("dialog[open]") || document.activeElement?.matches("input, select")) return;
    refreshing = true;
    const began = Date.now();
    try {
      await render();
    } finally {
      refreshing = false;
      notBefore = began + (Date.now() - began) * LOAD_SHARE;
    }
  }, REFRESH_MS);
}

async function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => {
    forgetKey();
    showSignIn("Signed out.");
  });
  window.addEventListener("hashchange", render);
  refreshLoop();
  if (!adminKey()) {
    showSignIn();
    return;
  }
  try {
    showApp(await api("/admin/api/session"));
  } catch (error) {
    forgetKey();
    showSignIn(error.message);
  }
}

start();
