// The console: login, pages by URL fragment (#/sessions), and one refresh
// loop for the page on screen (polling with fetch; the token stays in a
// header).

import { h, setText, clock } from './dom.js';
import * as api from './api.js';
import overview from './overview.js';
import recover from './recover.js';
import sessions from './sessions.js';
import metrics from './metrics.js';

const PAGES = { overview, recover, sessions, metrics };
// Polls slow down this much while the tab is hidden.
const HIDDEN_SLOWDOWN = 10;

const app = document.getElementById('app');
const top = document.getElementById('top');
const banner = document.getElementById('banner');
const foot = document.getElementById('foot');

let active = null;

// What pages share: the server's info, a hand-over between pages (the
// overview's "Recover" fills the recover form), and error handling.
const ctx = {
  info: null,
  handoff: null,
  go(page, handoff = null) {
    ctx.handoff = handoff;
    if (location.hash === `#/${page}`) open(page);
    else location.hash = `#/${page}`;
  },
  // Refreshes the page on screen now (after an action).
  refresh() {
    if (active && active.kick) active.kick();
  },
  // Turns a failure into a message for the page; a refused token logs out.
  failure(e) {
    if (e instanceof api.Unauthorized) {
      logout('The API refused the token (was it changed on the server?). Log in again.');
      return null;
    }
    return e.message || String(e);
  },
};

function showBanner(message) {
  banner.hidden = !message;
  setText(banner, message || '');
}

function stopActive() {
  if (active) {
    active.closed = true;
    clearTimeout(active.timer);
    if (active.page && active.page.unmount) active.page.unmount();
    active = null;
  }
}

function logout(error) {
  api.token.clear();
  ctx.info = null;
  showLogin(error);
}

function showLogin(error) {
  stopActive();
  top.hidden = true;
  showBanner(null);
  setText(foot, '');
  const input = h('input', {
    type: 'password', id: 'token', autocomplete: 'current-password', required: true,
    spellcheck: 'false', autocapitalize: 'off',
  });
  const err = h('p', { id: 'login-error', class: 'error', role: 'alert', hidden: !error }, error || '');
  const button = h('button', { type: 'submit', class: 'primary', id: 'login-submit' }, 'Log in');
  // No name on the input and CSP form-action 'none': the form can never be
  // submitted the classic way, so the token cannot end up in a URL.
  const form = h('form', { id: 'login', class: 'card login', novalidate: true },
    h('h1', {}, 'revive console'),
    h('p', { class: 'muted' },
      'Log in with the API token of this server: the token in the [api] section of the configuration file `revive serve` runs with.'),
    h('div', { class: 'field' }, h('label', { for: 'token' }, 'API token'), input),
    err,
    h('div', { class: 'actions' }, button));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const t = input.value.trim();
    const fail = (message) => {
      err.hidden = false;
      setText(err, message);
      input.select();
    };
    if (!t) return fail('Enter the API token.');
    if (!/^[\x20-\x7e]+$/.test(t)) return fail('An API token is printable ASCII.');
    button.disabled = true;
    try {
      ctx.info = await api.call('GET', '/api/v1/info', undefined, t);
      api.token.set(t);
      input.value = '';
      start();
    } catch (e2) {
      fail(e2 instanceof api.Unauthorized ? 'Wrong token: the API refused it.' : e2.message);
    } finally {
      button.disabled = false;
    }
  });
  app.replaceChildren(form);
  input.focus();
}

function pageName() {
  const name = location.hash.replace(/^#\/?/, '');
  return Object.hasOwn(PAGES, name) ? name : 'overview';
}

function open(name) {
  stopActive();
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.page === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const root = h('section', { class: 'page', id: `page-${name}` });
  app.replaceChildren(root);
  const view = { closed: false, timer: null, busy: false };
  active = view;
  const page = PAGES[name].mount(root, ctx);
  view.page = page;
  ctx.handoff = null;
  const tick = async () => {
    if (view.closed || view.busy) return;
    clearTimeout(view.timer);
    view.busy = true;
    try {
      await page.refresh();
      if (view.closed) return;
      showBanner(null);
      const info = ctx.info;
      setText(foot, `revive ${info ? info.version : ''} · updated ${clock()}`);
    } catch (e) {
      if (view.closed) return;
      const message = ctx.failure(e);
      if (message === null) return;
      showBanner(`Could not refresh: ${message}`);
    } finally {
      view.busy = false;
    }
    if (!view.closed && page.interval) {
      const wait = document.hidden ? page.interval * HIDDEN_SLOWDOWN : page.interval;
      view.timer = setTimeout(tick, wait);
    }
  };
  view.kick = tick;
  tick();
}

async function start() {
  if (!api.token.get()) {
    showLogin();
    return;
  }
  if (!ctx.info) {
    try {
      ctx.info = await api.get('/api/v1/info');
    } catch (e) {
      const message = ctx.failure(e);
      if (message === null) return;
      showBanner(`Could not reach revive: ${message}`);
    }
  }
  top.hidden = false;
  open(pageName());
}

document.getElementById('logout').addEventListener('click', () => logout(null));
window.addEventListener('hashchange', () => {
  if (api.token.get()) open(pageName());
});
document.addEventListener('visibilitychange', () => {
  // Refresh at once when the tab comes back instead of after a slow tick.
  if (!document.hidden && active) active.kick();
});
start();
