// The browser test harness: headless Chromium (Debian's `chromium`) driven
// by playwright-core. A test (a Rust test in tests/*.rs) runs a script of
// this folder with Node; the script opens pages at a running node's origin
// and prints one JSON line with its findings, which the Rust side checks.
//
// Pages are opened at the node's own origin: `openAt` answers one path of
// that origin with the given HTML (the request never reaches the node), so
// the page's EventSource and fetch calls are same-origin requests to the
// real node. Screenshots go to $WEFTLOG_ARTIFACTS (default
// target/browser-artifacts), kept as test artifacts.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

/** Where Chromium is: $CHROMIUM, or Debian's. */
export function chromiumPath() {
  for (const p of [process.env.CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser']) {
    if (p && fs.existsSync(p)) return p;
  }
  throw new Error('no chromium found (set CHROMIUM, or apt-get install chromium)');
}

/** A headless browser. */
export async function launch() {
  return chromium.launch({
    executablePath: chromiumPath(),
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
}

/** A new page showing `html` at `base + route` (same origin as the node). */
export async function openAt(browser, base, route, html) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.route(base + route, (r) => r.fulfill({ status: 200, contentType: 'text/html', body: html }));
  await page.goto(base + route);
  page.weftlogErrors = errors;
  return page;
}

/** Saves a screenshot of `page` as NAME.png in the artifacts folder. */
export async function screenshot(page, name) {
  const dir = process.env.WEFTLOG_ARTIFACTS || path.resolve('target/browser-artifacts');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

/** Polls `f` (async) until it returns a truthy value or `ms` pass. */
export async function until(f, ms, what) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Reads one line from stdin (the Rust side's go-ahead). */
export function readLine() {
  return new Promise((resolve) => {
    let buf = '';
    const on = (chunk) => {
      buf += chunk;
      const i = buf.indexOf('\n');
      if (i >= 0) {
        process.stdin.off('data', on);
        process.stdin.pause();
        resolve(buf.slice(0, i));
      }
    };
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', on);
    process.stdin.resume();
  });
}
