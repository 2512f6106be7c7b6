// Recover form: VM, restore point, host, write cache location, name, power
// on; posts one recover request and goes to the sessions page.

import { h, bytes, when, setText } from './dom.js';
import * as api from './api.js';

function field(id, label, input, hint) {
  return h('div', { class: 'field' }, h('label', { for: id }, label), input,
    hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null);
}

export default {
  mount(root, ctx) {
    const wanted = ctx.handoff || {};
    const vm = h('select', { id: 'recover-vm', required: true });
    const point = h('select', { id: 'recover-point' });
    const host = h('select', { id: 'recover-host' });
    const cache = h('input', { id: 'recover-cache', type: 'text', autocomplete: 'off', spellcheck: 'false' });
    const name = h('input', { id: 'recover-name', type: 'text', autocomplete: 'off', spellcheck: 'false' });
    const powerOn = h('input', { id: 'recover-power-on', type: 'checkbox' });
    const powerHint = h('p', { class: 'hint' });
    const error = h('p', { class: 'error', role: 'alert', id: 'recover-error', hidden: true });
    const submit = h('button', { type: 'submit', class: 'primary', id: 'recover-submit' }, 'Recover');
    const form = h('form', { class: 'card form', id: 'recover-form', novalidate: true },
      field('recover-vm', 'VM', vm),
      field('recover-point', 'Restore point', point),
      field('recover-host', 'Host', host),
      field('recover-cache', 'Write cache location', cache,
        'A folder on fast local storage; each session writes to <location>/<session name>.'),
      field('recover-name', 'Session name (optional)', name,
        'The VM folder on the export and the VM name on the host.'),
      h('div', { class: 'field check' }, powerOn, h('label', { for: 'recover-power-on' }, 'Power the VM on'), powerHint),
      error,
      h('div', { class: 'actions' }, submit));
    root.append(h('h1', {}, 'Recover a VM'),
      h('p', { class: 'muted' }, 'Publishes the restore point over NFS and, on a hypervisor host, registers the VM: it runs from the backup while writes go to the write cache.'),
      form);

    let points = [];
    let hosts = [];

    const fillPoints = () => {
      const mine = points.filter((p) => p.vm === vm.value).reverse();
      point.replaceChildren(
        h('option', { value: '' }, mine.length ? `latest (${when(mine[0].created)})` : 'latest'),
        ...mine.map((p) => h('option', { value: p.id },
          `${when(p.created)} · ${p.id.slice(0, 12)} · ${bytes(p.size)}`)));
      name.placeholder = vm.value ? `${vm.value}-ir` : '';
    };
    const fillPower = () => {
      const chosen = hosts.find((x) => x.name === host.value);
      const publishOnly = !chosen || chosen.publish_only;
      powerOn.disabled = publishOnly;
      if (publishOnly) powerOn.checked = false;
      setText(powerHint, publishOnly
        ? 'The publish-only host has no hypervisor: mount the export yourself.'
        : `Starts the VM on ${chosen.name} once registered.`);
    };
    vm.addEventListener('change', fillPoints);
    host.addEventListener('change', fillPower);

    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      error.hidden = true;
      const body = { vms: [vm.value], power_on: powerOn.checked };
      if (point.value) body.point = point.value;
      if (host.value) body.host = host.value;
      if (cache.value.trim()) body.cache = cache.value.trim();
      if (name.value.trim()) body.name = name.value.trim();
      submit.disabled = true;
      try {
        const created = await api.post('/api/v1/sessions', body);
        ctx.go('sessions', { highlight: created.map((s) => s.id) });
      } catch (e2) {
        const message = ctx.failure(e2);
        if (message !== null) {
          error.hidden = false;
          setText(error, `Recover refused: ${message}`);
        }
      } finally {
        submit.disabled = false;
      }
    });

    return {
      interval: 0,
      async refresh() {
        [points, hosts] = await Promise.all([api.get('/api/v1/points'), api.get('/api/v1/hosts')]);
        const vms = [...new Set(points.map((p) => p.vm))].sort((a, b) => a.localeCompare(b));
        vm.replaceChildren(...vms.map((v) => h('option', { value: v }, v)));
        if (wanted.vm && vms.includes(wanted.vm)) vm.value = wanted.vm;
        fillPoints();
        if (wanted.point) point.value = wanted.point;
        host.replaceChildren(...hosts.map((x) => h('option', { value: x.name, disabled: !x.available },
          x.available ? `${x.name} (${x.driver})` : `${x.name} (${x.driver}) - unavailable: ${x.error}`)));
        fillPower();
        cache.placeholder = ctx.info ? `${ctx.info.cache_root} (default)` : '';
        submit.disabled = vms.length === 0;
        if (vms.length === 0) {
          error.hidden = false;
          setText(error, 'The repository holds no restore point yet.');
        }
      },
    };
  },
};
