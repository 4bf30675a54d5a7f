// Three desks' pages (weftlog demo --serve) live through a partition:
// desk A's page cuts its network; A and B each sell workshop seats and edit
// the same attendee's email and notes; A's page heals. Every page must then
// show the oversell alert with its compensation, the email conflict, the
// merged notes and the reconnect notice; a staff override on C and a
// conflict resolved on B must show on every page. Prints one JSON line
// with what each page showed; screenshots go to the artifacts folder.
//
// Usage: node desk.mjs URL_A URL_B URL_C
import { launch, screenshot, until } from './harness.mjs';

const urls = process.argv.slice(2, 5);
const names = ['a', 'b', 'c'];
const WAIT = 40000;
const ATTENDEE = 'a1003';
const EMAIL = { a: 'li.wen@harbor.example', b: 'wen.li@newmail.example' };
const NOTE = { a: ' - A: prefers an aisle seat', b: 'B: arrives by wheelchair. ' };

const browser = await launch();
const pages = [];
const errors = [];
const step = (what) => process.stderr.write(`desk.mjs: ${what}\n`);

async function open(url, name) {
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  page.on('pageerror', (e) => errors.push(`${name}: ${e}`));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`${name} console: ${m.text()}`); });
  await page.goto(url);
  await until(() => page.locator('[data-session]').count().then((n) => n === 3), WAIT, `${name}: three sessions`);
  await until(() => page.locator(`[data-attendee="${ATTENDEE}"]`).count().then((n) => n === 1), WAIT, `${name}: the attendee listed`);
  return page;
}

async function selectAttendee(page) {
  await page.click(`[data-attendee="${ATTENDEE}"]`);
  await until(() => page.locator('[data-edit="email"]').count().then((n) => n === 1), WAIT, 'the attendee open');
}

async function editEmail(page, value) {
  await page.click('[data-edit="email"]');
  const input = page.locator('input[data-field="email"]');
  await input.fill(value);
  await input.press('Enter');
  await until(() => page.locator('.fields .value[data-field="email"]').textContent().then((t) => t === value), WAIT, `email shown as ${value}`);
}

async function editNotes(page, f) {
  const area = page.locator('#notes');
  await area.click();
  const now = await area.inputValue();
  await area.fill(f(now));
  await page.click('#save-notes');
  await until(() => page.locator('#toast').textContent().then((t) => t.includes('Notes saved')), WAIT, 'notes saved');
}

async function sell(page, seats) {
  const box = page.locator('[data-session="workshop"]');
  await box.locator('input').fill(String(seats));
  await page.evaluate(() => { document.getElementById('toast').textContent = ''; });
  await box.locator('[data-sell]').click();
  return until(async () => {
    const t = await page.locator('#toast').textContent();
    return t.length > 0 ? t : null;
  }, WAIT, `a sale of ${seats}`);
}

const conn = (page) => page.locator('#conn').getAttribute('data-state');

try {
  for (let i = 0; i < 3; i++) pages.push(await open(urls[i], names[i]));
  const [a, b, c] = pages;
  await screenshot(a, 'desk-a-start');

  step('cutting desk A off');
  await until(() => a.locator('#drill').textContent().then((t) => t.includes('Cut')), WAIT, 'the cut control');
  await a.click('#drill');
  await until(() => conn(a).then((s) => s === 'offline'), WAIT, 'desk A offline');
  await until(() => conn(b).then((s) => s === 'partial'), WAIT, 'desk B without A');

  step('both sides edit and sell');
  await selectAttendee(a);
  await selectAttendee(b);
  await editEmail(a, EMAIL.a);
  await editEmail(b, EMAIL.b);
  await editNotes(a, (t) => t + NOTE.a);
  await editNotes(b, (t) => NOTE.b + t);
  // Desk A holds 3 workshop seats: it sells them and 3 more on credit (the
  // policy's max_overdraft). Desk B sells its 4 and 3 more with rights
  // desk C moves to it. 1 + 6 + 7 = 14 of 12: 2 oversold.
  const sales = { a: [await sell(a, 3), await sell(a, 3)], b: [await sell(b, 4), await sell(b, 3)] };
  await screenshot(a, 'desk-a-offline');

  step('healing');
  await a.click('#drill');
  await until(() => conn(a).then((s) => s === 'online'), WAIT, 'desk A online again');

  step('checking every page');
  const shown = {};
  for (let i = 0; i < 3; i++) {
    const p = pages[i];
    const n = names[i];
    await until(() => p.locator('.alert.oversell').count().then((k) => k > 0), WAIT, `${n}: an oversell alert`);
    await until(() => p.locator('.alert.oversell.done').count().then((k) => k > 0), WAIT, `${n}: the compensation`);
    await until(() => p.locator('#conflicts li[data-stream="attendee/a1003"][data-field="email"]').count().then((k) => k === 1), WAIT, `${n}: the email conflict in the inbox`);
    await until(() => p.locator('.alert.reconnect').count().then((k) => k > 0), WAIT, `${n}: the reconnect notice`);
    if (i === 2) await selectAttendee(p);
    await until(async () => {
      const t = await p.locator('#notes').inputValue();
      return t.includes(NOTE.a.trim()) && t.includes(NOTE.b.trim());
    }, WAIT, `${n}: merged notes`);
    await until(() => p.locator('.choices[data-conflict="email"] .choice').count().then((k) => k === 2), WAIT, `${n}: both emails on the record`);
    shown[n] = {
      oversell: await p.locator('.alert.oversell .title').first().textContent(),
      reconnect: await p.locator('.alert.reconnect .title').first().textContent(),
      reconnect_body: await p.locator('.alert.reconnect .body').first().textContent(),
      conflict: await p.locator('#conflicts li[data-field="email"]').textContent(),
      notes: await p.locator('#notes').inputValue(),
      sessions: await p.locator('[data-session="workshop"] .figures').textContent(),
    };
    await screenshot(p, `desk-${n}-after-heal`);
  }

  step('a staff decision on C, a conflict resolved on B');
  await c.locator('.alert.oversell button', { hasText: 'Honour the sale' }).first().click();
  for (const [i, p] of pages.entries()) {
    await until(() => p.locator('.alert.oversell .title').first().textContent().then((t) => t.includes('decided by staff')), WAIT, `${names[i]}: the staff decision`);
  }
  await b.locator('#conflicts li[data-field="email"] .choice button').first().click();
  for (const [i, p] of pages.entries()) {
    await until(() => p.locator('#conflict-count').textContent().then((t) => t === '0'), WAIT, `${names[i]}: no conflict left`);
    shown[names[i]].after = {
      oversell: await p.locator('.alert.oversell .title').first().textContent(),
      email: await p.locator('.fields .value[data-field="email"]').textContent(),
    };
  }
  for (let i = 0; i < 3; i++) await screenshot(pages[i], `desk-${names[i]}-end`);
  console.log(JSON.stringify({ phase: 'done', sales, shown, errors }));
} catch (e) {
  for (let i = 0; i < pages.length; i++) await screenshot(pages[i], `desk-${names[i]}-failed`).catch(() => {});
  console.log(JSON.stringify({ phase: 'failed', error: String(e && e.stack || e), errors }));
} finally {
  await browser.close();
}
