// Sessions: one card per session, updated in place every second: state
// (retries as "waiting 3/10"), write cache used, migration progress, last
// error, and migrate / retry / stop behind a confirmation.

import { h, bytes, when, clock, setText, words, confirmDialog } from './dom.js';
import * as api from './api.js';

const FINISHED = ['done', 'cancelled'];

// The state as the CLI shows it, plus a detail line.
function stateOf(s) {
  const r = s.retries;
  if (s.state === 'waiting') {
    const label = `waiting ${r.attempt}/${r.max}`;
    const detail = r.next_at
      ? `next try at ${clock(r.next_at)}`
      : 'automatic retries used up: retry by hand';
    return { label, detail };
  }
  if (s.state === 'failed') return { label: 'failed', detail: `${words(s.resume || 'step')} failed: retry runs it again` };
  return { label: words(s.state), detail: '' };
}

function fact(label, value) {
  return h('div', {}, h('dt', {}, label), value);
}

function makeCard(s, ctx) {
  const f = {
    state: h('span', { class: 'badge', 'data-field': 'state' }),
    detail: h('p', { class: 'hint', 'data-field': 'detail' }),
    vm: h('dd', { 'data-field': 'vm' }),
    point: h('dd', { 'data-field': 'point' }),
    host: h('dd', { 'data-field': 'host' }),
    cache: h('dd', { 'data-field': 'cache' }),
    updated: h('dd', { 'data-field': 'updated' }),
    migrationLabel: h('p', { class: 'migration-label', 'data-field': 'migration' }),
    bar: h('div', { class: 'bar' }),
    error: h('p', { class: 'error', role: 'alert', 'data-field': 'error' }),
    notice: h('p', { class: 'notice', 'data-field': 'notice', hidden: true }),
  };
  f.progress = h('div', {
    class: 'progress', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': '0',
  }, f.bar);
  f.migration = h('div', { class: 'migration', hidden: true }, f.migrationLabel, f.progress);
  const act = (action, label, cls) => h('button', { type: 'button', class: cls, 'data-action': action }, label);
  f.buttons = {
    migrate: act('migrate', 'Migrate…', 'primary'),
    retry: act('retry', 'Retry…', ''),
    stop: act('stop', 'Stop…', 'danger'),
  };
  const card = h('article', { class: 'card session', 'data-id': s.id, 'data-name': s.name },
    h('div', { class: 'card-head' }, h('h2', { class: 'session-name' }, s.name), f.state),
    f.detail,
    h('dl', { class: 'facts' },
      fact('VM', f.vm), fact('Restore point', f.point), fact('Host', f.host),
      fact('Write cache', f.cache), fact('Updated', f.updated)),
    f.migration, f.error, f.notice,
    h('div', { class: 'actions' }, f.buttons.migrate, f.buttons.retry, f.buttons.stop));
  const entry = { card, f, s };
  for (const [action, button] of Object.entries(f.buttons)) {
    button.addEventListener('click', () => act_(entry, action, ctx));
  }
  return entry;
}

async function act_(entry, action, ctx) {
  const s = entry.s;
  let body;
  if (action === 'migrate') {
    const values = await confirmDialog({
      title: `Migrate ${s.name}`,
      message: 'Moves the VM to production storage. A copy migration copies the files while the VM runs, then stops it, copies the last writes and starts it from the copy; a live migration is done by the hypervisor.',
      fields: [
        { name: 'to', label: 'Destination (a folder; a datastore for vSphere)', placeholder: '/srv/production', required: true },
        {
          name: 'method',
          label: 'Method',
          value: s.driver === 'vsphere' ? 'live' : 'copy',
          options: [
            ['copy', 'copy: revive copies, then switches over', s.driver === 'vsphere'],
            ['live', 'live: the hypervisor moves the running VM', s.driver === 'none'],
          ],
        },
      ],
      confirm: 'Start migration',
    });
    if (!values) return;
    body = { to: values.to, method: values.method };
  } else if (action === 'retry') {
    const ok = await confirmDialog({
      title: `Retry ${s.name}`,
      message: `Runs the ${words(s.resume || 'failed')} step again now.${s.error ? ` Last error: ${s.error}` : ''}`,
      confirm: 'Retry now',
    });
    if (!ok) return;
  } else {
    const ok = await confirmDialog({
      title: `Stop ${s.name}`,
      message: 'Powers the VM off, unregisters it, unpublishes its folder and deletes its write cache. Writes that were not migrated are lost.',
      confirm: 'Stop the session',
      danger: true,
    });
    if (!ok) return;
  }
  const notice = entry.f.notice;
  try {
    await api.post(`/api/v1/sessions/${api.seg(s.id)}/${action}`, body);
    notice.hidden = true;
    ctx.refresh();
  } catch (e) {
    const message = ctx.failure(e);
    if (message === null) return;
    notice.hidden = false;
    setText(notice, `${action} refused: ${message}`);
  }
}

function update(entry, s) {
  entry.s = s;
  const { card, f } = entry;
  const st = stateOf(s);
  card.dataset.state = s.state;
  card.classList.toggle('finished', FINISHED.includes(s.state));
  setText(f.state, st.label);
  f.state.className = `badge state-${s.state}`;
  setText(f.detail, st.detail);
  f.detail.hidden = !st.detail;
  setText(f.vm, s.vm);
  setText(f.point, s.point);
  setText(f.host, `${s.host} (${s.driver})`);
  setText(f.cache, s.cache_bytes === null || s.cache_bytes === undefined ? '—' : bytes(s.cache_bytes));
  setText(f.updated, when(s.updated));
  const m = s.migration;
  f.migration.hidden = !m;
  if (m) {
    const pct = Math.max(0, Math.min(100, m.percent));
    f.progress.setAttribute('aria-valuenow', String(pct));
    f.bar.style.width = `${pct}%`;
    const copied = m.method === 'copy' ? ` · ${bytes(m.bytes_copied)} copied` : '';
    setText(f.migrationLabel, `${m.method} migration to ${m.destination}: ${pct}%${copied}`);
  }
  setText(f.error, s.error || '');
  f.error.hidden = !s.error;
  f.buttons.migrate.hidden = s.state !== 'running';
  f.buttons.retry.hidden = !['waiting', 'failed'].includes(s.state);
  f.buttons.stop.hidden = FINISHED.includes(s.state) || s.state === 'stopping';
}

export default {
  mount(root, ctx) {
    const highlight = new Set((ctx.handoff && ctx.handoff.highlight) || []);
    const hideFinished = h('input', { type: 'checkbox', id: 'hide-finished' });
    const list = h('div', { class: 'sessions' });
    const empty = h('p', { class: 'muted', hidden: true }, 'No sessions. ', h('a', { href: '#/recover' }, 'Recover a VM'), '.');
    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Sessions'),
        h('label', { class: 'check' }, hideFinished, ' Hide finished')),
      empty, list);
    const cards = new Map();
    let latest = [];
    const render = () => {
      const shown = latest.filter((s) => !(hideFinished.checked && FINISHED.includes(s.state)));
      const order = shown.map((s) => cards.get(s.id).card);
      const same = order.length === list.children.length && order.every((c, i) => list.children[i] === c);
      if (!same) list.replaceChildren(...order);
      empty.hidden = shown.length > 0;
    };
    hideFinished.addEventListener('change', render);
    return {
      interval: 1000,
      async refresh() {
        const sessions = await api.get('/api/v1/sessions');
        sessions.sort((a, b) => (b.created < a.created ? -1 : b.created > a.created ? 1 : 0));
        const seen = new Set();
        for (const s of sessions) {
          seen.add(s.id);
          let entry = cards.get(s.id);
          if (!entry) {
            entry = makeCard(s, ctx);
            if (highlight.has(s.id)) entry.card.classList.add('highlight');
            cards.set(s.id, entry);
          }
          update(entry, s);
        }
        for (const id of [...cards.keys()]) if (!seen.has(id)) cards.delete(id);
        latest = sessions;
        render();
      },
    };
  },
};
