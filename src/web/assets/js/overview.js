// Repository overview: every VM with its restore points (time, size, new
// and stored bytes, verification, where published), newest first.

import { h, bytes, when } from './dom.js';
import * as api from './api.js';

function tile(label, value, id) {
  return h('div', { class: 'tile', id }, h('span', { class: 'tile-label' }, label),
    h('span', { class: 'tile-value' }, value));
}

function verifyText(p) {
  if (p.boot) return 'boot ' + p.boot.verdict;
  return p.verify === null || p.verify === undefined ? 'not recorded' : p.verify;
}

function pointRow(p, ctx) {
  const published = p.published.map((x) => x.name).join(', ');
  const cell = (label, ...content) => h('td', { 'data-label': label }, ...content);
  return h('tr', { 'data-point': p.id },
    cell('Created', when(p.created)),
    cell('Point', h('code', { title: p.id }, p.id.slice(0, 12))),
    cell('Size', bytes(p.size)),
    cell('New', bytes(p.bytes_new)),
    cell('Stored', bytes(p.bytes_stored)),
    cell('Verified', h('span', { class: p.verify || p.boot ? 'badge' : 'muted' }, verifyText(p))),
    cell('Published', published || h('span', { class: 'muted' }, '—')),
    h('td', { class: 'row-action' }, h('button', {
      type: 'button', class: 'quiet', 'data-action': 'recover',
      onclick: () => ctx.go('recover', { vm: p.vm, point: p.id }),
    }, 'Recover…')));
}

function vmCard(vm, points, ctx) {
  const newest = [...points].reverse();
  const latest = newest[0];
  return h('section', { class: 'card vm', 'data-vm': vm },
    h('div', { class: 'card-head' },
      h('h2', { class: 'vm-name' }, vm),
      h('button', {
        type: 'button', class: 'primary', 'data-action': 'recover-latest',
        onclick: () => ctx.go('recover', { vm, point: '' }),
      }, 'Recover latest')),
    h('p', { class: 'muted' },
      `${points.length} restore point${points.length === 1 ? '' : 's'} · latest ${when(latest.created)} · ${bytes(latest.size)}`),
    h('div', { class: 'table-wrap' }, h('table', { class: 'points' },
      h('thead', {}, h('tr', {},
        ['Created', 'Point', 'Size', 'New', 'Stored', 'Verified', 'Published', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, newest.map((p) => pointRow(p, ctx))))));
}

export default {
  mount(root, ctx) {
    const tiles = h('div', { class: 'tiles' });
    const list = h('div', { class: 'vms' });
    root.append(h('h1', {}, 'Repository'), tiles, list);
    return {
      interval: 15000,
      async refresh() {
        const [points, sessions] = await Promise.all([api.get('/api/v1/points'), api.get('/api/v1/sessions')]);
        const byVm = new Map();
        for (const p of points) {
          if (!byVm.has(p.vm)) byVm.set(p.vm, []);
          byVm.get(p.vm).push(p);
        }
        const vms = [...byVm.keys()].sort((a, b) => a.localeCompare(b));
        const live = sessions.filter((s) => !['done', 'cancelled'].includes(s.state)).length;
        tiles.replaceChildren(
          tile('VMs', String(vms.length), 'tile-vms'),
          tile('Restore points', String(points.length), 'tile-points'),
          tile('Stored by backups', bytes(points.reduce((n, p) => n + p.bytes_stored, 0)), 'tile-stored'),
          tile('Active sessions', String(live), 'tile-sessions'));
        if (vms.length === 0) {
          list.replaceChildren(h('p', { class: 'muted' },
            'No restore points yet: back a VM up with `revive backup --repo REPO FOLDER`.'));
          return;
        }
        list.replaceChildren(...vms.map((vm) => vmCard(vm, byVm.get(vm), ctx)));
      },
    };
  },
};
