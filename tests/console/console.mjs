// Drives the operator console in headless Chromium (playwright-core) for the end-to-end test
// tests/tests/it/console.rs. The Rust test starts the stack, the agent and esp32-sim, runs this
// script, and checks the simulator's side at each `STEP name` line this script prints; it
// answers `ok` (or `fail why`) on stdin. Environment: CONSOLE_URL, OPERATOR_TOKEN, MASTER,
// SLAVE, PLAYWRIGHT_CORE (path of playwright-core's index.mjs), CHROMIUM, SCREENSHOTS.
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("CONSOLE_URL");
const token = env("OPERATOR_TOKEN");
const master = env("MASTER");
const slave = env("SLAVE");
const shots = env("SCREENSHOTS");
const macroId = env("MACRO_ID");
mkdirSync(shots, { recursive: true });
const { chromium } = await import(env("PLAYWRIGHT_CORE"));

const input = createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
/** Tells the Rust side to check `name`, and waits for its verdict. */
async function step(name) {
  console.log(`STEP ${name}`);
  const { value, done } = await lines.next();
  if (done || value.trim() !== "ok") throw new Error(`step ${name}: ${done ? "no answer" : value}`);
}
const check = (cond, what) => {
  if (!cond) throw new Error(`check failed: ${what}`);
};
const relay = (n) => `[data-relay="${master}|${slave}|${n}"]`;
const timeout = 15_000;

let current = null;
const browser = await chromium.launch({
  executablePath: env("CHROMIUM"),
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const desktop = { viewport: { width: 1280, height: 900 } };
  const phone = { viewport: { width: 360, height: 740 }, isMobile: true, hasTouch: true };

  // ---- signed out: only the sign-in page (with the stop); actions are refused.
  const context = await browser.newContext(desktop);
  const page = await context.newPage();
  current = page;
  await page.goto(`${base}/`);
  check(page.url().endsWith("/console/signin"), `signed out lands on sign-in: ${page.url()}`);
  let r = await context.request.post(`${base}/console/switch`, {
    form: { master, slave, relay: "1", action: "on", seconds: "5" },
  });
  check(r.status() === 401, `a switch without a session is refused: ${r.status()}`);
  r = await context.request.get(`${base}/console/live`);
  check(r.status() === 401, `the live view needs a session: ${r.status()}`);
  await page.fill("#token", "not-the-token");
  await page.click("form.signin button");
  await page.waitForSelector("p.error");
  check((await page.textContent("p.error")).includes("not the operator token"), "a wrong token is refused");

  // ---- sign in.
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(`${base}/console`), page.click("form.signin button")]);
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "autocore_console");
  check(session && session.httpOnly && session.sameSite === "Strict", `session cookie: ${JSON.stringify(cookies)}`);
  const csrf = await page.getAttribute('meta[name="csrf-token"]', "content");
  check(csrf && csrf.length >= 32, "the page carries a CSRF token");

  // ---- a signed-in request without or with a wrong CSRF token is refused.
  for (const headers of [{}, { "X-CSRF-Token": "0".repeat(64) }]) {
    r = await context.request.post(`${base}/console/switch`, {
      headers,
      form: { master, slave, relay: "1", action: "on", seconds: "5" },
    });
    check(r.status() === 403, `a bad CSRF token is refused: ${r.status()}`);
  }
  r = await context.request.post(`${base}/console/switch`, {
    form: { master, slave, relay: "1", action: "on", seconds: "5", csrf: "wrong" },
  });
  check(r.status() === 403, `a wrong csrf field is refused: ${r.status()}`);
  await step("refused-requests");

  // ---- relays: switch on from the page; the page shows it live (no reload).
  await page.goto(`${base}/console/relays`);
  for (let i = 0; !(await page.$(relay(1))); i++) {
    check(i < 60, "the slave's relays appear on the Relays page");
    await page.waitForTimeout(250);
    await page.reload();
  }
  await page.waitForFunction(() => document.body.dataset.live === "open", null, { timeout });
  await page.evaluate(() => { window.notReloaded = true; });
  await page.click('[data-testid="on-1"]');
  await page.waitForSelector(`${relay(1)}[data-on="true"]`, { timeout });
  check(await page.evaluate(() => window.notReloaded === true), "the state arrived without a reload");
  await step("relay1-on");
  await page.click('[data-testid="off-1"]');
  await page.waitForSelector(`${relay(1)}[data-on="false"]`, { timeout });
  await step("relay1-off");

  // ---- a mutex-group refusal shows its reason.
  await page.check('[data-testid="together-2"]');
  await page.check('[data-testid="together-3"]');
  await page.click('[data-testid="together-on"]');
  await page.waitForFunction(() => document.getElementById("notice").textContent.includes("mutex group"), null, { timeout });
  const refusal = await page.textContent("#notice");
  check(refusal.includes("refused") && refusal.includes("'motor'"), `mutex refusal: ${refusal}`);
  await step("mutex-refused");

  // ---- hold-to-run: on while held, off on release.
  const hold = page.locator('[data-testid="hold-1"]');
  await hold.hover();
  await page.mouse.down();
  await page.waitForSelector(`${relay(1)}[data-on="true"]`, { timeout });
  await step("hold-on");
  await page.waitForTimeout(2_000);
  check((await page.getAttribute(relay(1), "data-on")) === "true", "still on while held past the 1 s lease");
  await step("hold-still-on");
  await page.mouse.up();
  await page.waitForSelector(`${relay(1)}[data-on="false"]`, { timeout });
  await step("hold-released");

  // ---- hold-to-run from the keyboard: Space held on the focused button.
  await page.focus('[data-testid="hold-1"]');
  await page.keyboard.down(" ");
  await page.waitForSelector(`${relay(1)}[data-on="true"]`, { timeout });
  await step("key-hold-on");
  await page.keyboard.up(" ");
  await page.waitForSelector(`${relay(1)}[data-on="false"]`, { timeout });
  await step("key-hold-released");

  // ---- hold-to-run: off when the page is closed mid-hold.
  const second = await context.newPage();
  await second.goto(`${base}/console/relays`);
  await second.waitForFunction(() => document.body.dataset.live === "open", null, { timeout });
  await second.locator('[data-testid="hold-1"]').hover();
  await second.mouse.down();
  await second.waitForSelector(`${relay(1)}[data-on="true"]`, { timeout });
  await step("hold-on-again");
  await second.close();
  await step("hold-page-closed");

  // ---- macros: run, the running step shown live, cancel.
  await page.goto(`${base}/console/macros`);
  for (let i = 0; !(await page.$(`[data-live="macro:${macroId}"]`)); i++) {
    check(i < 60, "the macro appears on the Macros page");
    await page.waitForTimeout(250);
    await page.reload();
  }
  await page.waitForFunction(() => document.body.dataset.live === "open", null, { timeout });
  const status = `[data-live="macro:${macroId}"]`;
  check((await page.textContent(status)).includes("idle"), "idle before it runs");
  await page.click(`section.macro:has(${status}) form[action="/console/macros/run"] button`);
  await page.waitForFunction((s) => document.querySelector(s).textContent.includes("running, step 2"), status, { timeout });
  await step("macro-running");
  await page.screenshot({ path: `${shots}/macros-running-desktop.png`, fullPage: true });
  await page.click(`section.macro:has(${status}) form[action="/console/macros/cancel"] button`);
  await page.waitForFunction((s) => document.querySelector(s).textContent.includes("idle"), status, { timeout });
  check((await page.textContent("#notice")).includes("cancelled"), "the cancel is confirmed");
  await page.goto(`${base}/console/relays`);
  await page.click('[data-testid="off-1"]');
  await page.waitForSelector(`${relay(1)}[data-on="false"]`, { timeout });
  await step("macro-cancelled-relay-off");

  // ---- rules: a firing's explanation once the pH ramp crosses the rule; the replay.
  await page.goto(`${base}/console/rules`);
  for (let i = 0; !(await page.$('[data-rule="RULE_001"] .explanation')); i++) {
    check(i < 60, "a firing of RULE_001 appears on the Rules page");
    await page.waitForTimeout(500);
    await page.reload();
  }
  const explanation = await page.textContent('[data-rule="RULE_001"] .explanation');
  check(explanation.includes("ph") && explanation.includes("6.5"), `explanation: ${explanation}`);
  await page.click('[data-rule="RULE_001"] form.test button');
  await page.waitForSelector("#replay pre");
  const replay = await page.textContent("#replay pre");
  check(/RULE_001 on .*: \d+ readings replayed, [1-9]\d* firings/.test(replay), `replay: ${replay}`);

  // ---- telemetry: the pH chart from the Pi's history.
  await page.goto(`${base}/console/telemetry`);
  check((await page.$$("svg.chart polyline.avg")).length >= 2, "pH charts drawn (hour and day)");

  // ---- every page, desktop and 360 px: screenshots, and no layout wider than the screen.
  const pages = ["", "/devices", "/relays", "/rules", "/telemetry", "/macros", "/events"];
  const narrow = await browser.newContext(phone);
  await narrow.addCookies([{ ...session }]);
  const small = await narrow.newPage();
  for (const p of pages) {
    const name = p === "" ? "overview" : p.slice(1);
    await page.goto(`${base}/console${p}`);
    await page.screenshot({ path: `${shots}/${name}-desktop.png`, fullPage: true });
    await small.goto(`${base}/console${p}`);
    const width = await small.evaluate(() => document.documentElement.scrollWidth);
    check(width <= 360, `${name} fits 360 px: ${width}`);
    await small.screenshot({ path: `${shots}/${name}-360.png`, fullPage: true });
  }

  // ---- the backend stops: the Overview shows it unreachable and the outbox growing; the
  // console keeps working.
  await page.goto(`${base}/console`);
  await page.waitForFunction(() => document.body.dataset.live === "open", null, { timeout });
  await step("stop-backend");
  await page.waitForFunction(() => document.querySelector('[data-live="backend"]').textContent.includes("unreachable"), null, { timeout: 30_000 });
  const depth = async () => Number(await page.textContent('[data-live="outbox_depth"]'));
  const before = await depth();
  await page.waitForFunction((b) => Number(document.querySelector('[data-live="outbox_depth"]').textContent) > b, before, { timeout });
  check((await depth()) > before, "the outbox grows while the backend is away");
  await page.screenshot({ path: `${shots}/overview-backend-down-desktop.png`, fullPage: true });
  await page.goto(`${base}/console/relays`);
  await page.waitForFunction(() => document.body.dataset.live === "open", null, { timeout });
  await page.click('[data-testid="on-1"]');
  await page.waitForSelector(`${relay(1)}[data-on="true"]`, { timeout });
  await step("relay1-on-offline");

  // ---- the emergency stop, signed out (a phone): every relay off, the latch shown, a
  // switch-on refused with the reason, the reset only for the operator.
  const stranger = await browser.newContext(phone);
  const outside = await stranger.newPage();
  await outside.goto(`${base}/console/signin`);
  check(await outside.isHidden("#latch"), "not latched yet");
  await outside.click("#stop");
  await outside.waitForSelector("#latch:not([hidden])", { timeout });
  check((await outside.textContent("#latch")).includes("EMERGENCY STOP latched"), "the latch is shown");
  await outside.screenshot({ path: `${shots}/signin-stopped-360.png`, fullPage: true });
  await step("stopped");
  check(!(await outside.$("#reset")), "no reset without sign-in");
  r = await stranger.request.post(`${base}/console/reset`, { form: { csrf: "x" } });
  check(r.status() === 401, `a reset without a session is refused: ${r.status()}`);
  // The signed-in page learns of the latch live, and a switch-on is refused with the reason.
  await page.waitForSelector("#latch:not([hidden])", { timeout });
  await page.waitForSelector(`${relay(1)}[data-on="false"]`, { timeout });
  await page.click('[data-testid="on-1"]');
  await page.waitForFunction(() => document.getElementById("notice").textContent.includes("emergency stop is latched"), null, { timeout });
  await page.screenshot({ path: `${shots}/relays-stopped-desktop.png`, fullPage: true });
  await step("switch-refused-latched");
  await page.click("#reset");
  await page.waitForSelector("#latch[hidden]", { state: "attached", timeout });
  await step("reset");

  // ---- events: filtered by severity and by device.
  await page.goto(`${base}/console/events?severity=critical`);
  const critical = await page.$$eval("ol.events li", (items) => items.map((li) => [li.dataset.severity, li.textContent]));
  check(critical.length >= 1 && critical.every(([s]) => s === "critical"), `critical only: ${JSON.stringify(critical)}`);
  check(critical.some(([, t]) => t.includes("emergency stop by console")), `the stop is listed: ${JSON.stringify(critical)}`);
  await page.goto(`${base}/console/events?device=${encodeURIComponent(master)}`);
  const mine = await page.$$eval("ol.events li .dev", (items) => items.map((el) => el.textContent));
  check(mine.length >= 1 && mine.every((d) => d === master), `device filter: ${JSON.stringify(mine)}`);
  check((await page.textContent("ol.events")).includes("mutex group 'motor'"), "the mutex refusal is an event");
  await page.goto(`${base}/console/events`);
  await page.screenshot({ path: `${shots}/events-desktop.png`, fullPage: true });
  await page.setViewportSize({ width: 360, height: 740 });
  await page.screenshot({ path: `${shots}/events-360.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.goto(`${base}/console/relays`);
  await page.waitForFunction(() => document.body.dataset.live === "open", null, { timeout });

  // ---- the page says when its own connection to the agent is lost.
  await step("shut-down-agent");
  await page.waitForSelector("#conn:not([hidden])", { timeout });
  await page.screenshot({ path: `${shots}/relays-connection-lost-desktop.png` });
  console.log("DONE");
} catch (e) {
  // What the operator saw when it failed.
  if (current && !current.isClosed()) {
    const notice = await current.textContent("#notice").catch(() => "?");
    console.error(`at ${current.url()}: notice ${JSON.stringify(notice)}`);
    await current.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  }
  throw e;
} finally {
  await browser.close();
  input.close();
}
