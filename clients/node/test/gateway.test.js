'use strict';
// Against a live mesh (the store, the router and the three example bots of examples/*.yaml), whose
// addresses come from the environment (scripts/polyglot_ci.sh starts one and sets them):
//   MBC_ENTRY_BOT  host:port of personal-banking, where the conversation starts
//   MBC_STORE      host:port of the Context Session Store
//   MBC_ROUTER     host:port of the router (the tests that locate a bot's instances)
//   MBC_REQUIRE_MESH=1 turns missing addresses into a failure instead of a skip
// The messages are the demo's (mbc/cli/demo.py, SCRIPT).
const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { Mesh, call, grpc } = require('../gateway');

const entry = process.env.MBC_ENTRY_BOT;
const store = process.env.MBC_STORE;
const router = process.env.MBC_ROUTER;
const noMesh = !entry || !store;
if (noMesh && process.env.MBC_REQUIRE_MESH) throw new Error('MBC_ENTRY_BOT and MBC_STORE must name a live mesh');
const skip = noMesh && 'no live mesh: set MBC_ENTRY_BOT and MBC_STORE (scripts/polyglot_ci.sh does)';

const mesh = new Mesh();
after(() => mesh.close());
const chat = noMesh ? null : mesh.conversation({ entryAddress: entry, storeAddress: store, consumerId: 'node-consumer',
  channelMetadata: { channel: 'node-test' }, timeoutMs: 15000 });

async function send(t, text) {
  const r = await chat.send(text);
  t.diagnostic(`consumer > ${text}`);
  for (const reply of r.replies) t.diagnostic(`  ${reply.botId} > ${reply.text}`);
  t.diagnostic(`  [${r.outcome}; match ${r.match.botId}/${r.match.intent} ${r.match.rating}; owner ${r.owner.botId}]`);
  return r;
}

function expectAnswered(r, botId, intent) {
  assert.equal(r.outcome, 'OUTCOME_ANSWERED');
  if (intent) assert.deepEqual([r.match.botId, r.match.intent], [botId, intent]);
  assert.ok(r.replies.length > 0 && r.replies[0].text, 'an answer');
  assert.equal(r.replies[0].botId, botId);
  assert.equal(r.owner.botId, botId);
}

async function expectTransfer(r, from, to, toDisplayName, intent) {
  assert.equal(r.outcome, 'OUTCOME_TRANSFERRED');
  assert.deepEqual([r.match.botId, r.match.intent], [to, intent]);
  assert.ok(r.transferId, 'a transfer id');
  assert.ok(r.replies.length >= 2, "the sender's transfer message, then the receiver's answer");
  // The sender's transfer message names the receiver (its display name).
  assert.equal(r.replies[0].botId, from);
  assert.match(r.replies[0].text, new RegExp(toDisplayName));
  const last = r.replies[r.replies.length - 1];
  assert.equal(last.botId, to);
  assert.ok(last.text);
  assert.equal(r.owner.botId, to);
  assert.ok(r.owner.address);
  assert.equal(chat.ownerBotId, to);
  // The Context Session Store records the new owner.
  const owner = await call(mesh.store(store), 'GetOwner', { conversationId: chat.conversationId }, 5000);
  assert.equal(owner.found, true);
  assert.equal(owner.ownership.owner.botId, to);
  assert.equal(owner.ownership.transferId, r.transferId);
}

test('a conversation through the mesh', { skip }, async (t) => {
  await t.test('local answer', async (t) => {
    expectAnswered(await send(t, 'Hi there!'), 'personal-banking', 'greeting');
    expectAnswered(await send(t, 'Sam'), 'personal-banking', '');
    expectAnswered(await send(t, "What's the balance on my checking account?"), 'personal-banking', 'check_balance');
  });
  await t.test('transfer with intent and message', async (t) => {
    let r = await send(t, 'I just started a bakery. How do I open a business account for my LLC?');
    await expectTransfer(r, 'personal-banking', 'business-banking', 'Business Banking Assistant', 'open_business_account');
    // The new owner answers the next message itself.
    expectAnswered(await send(t, 'Could my bookkeeper get her own login to our business account?'), 'business-banking', 'manage_business_users');
    r = await send(t, 'Also, I think I lost my debit card yesterday');
    await expectTransfer(r, 'business-banking', 'cards', 'Cards Assistant', 'lost_or_stolen_card');
  });
  await t.test('fallback', async (t) => {
    const r = await send(t, 'Which pizza place near me delivers the fastest?');
    assert.equal(r.outcome, 'OUTCOME_FALLBACK');
    assert.equal(r.replies.length, 1);
    assert.equal(r.replies[0].botId, 'cards');
    assert.ok(r.replies[0].text);
    assert.equal(r.owner.botId, 'cards');
    assert.equal(r.match.intent, '');
  });
});

const skipRouter = skip || (!router && 'no live router: set MBC_ROUTER (scripts/polyglot_ci.sh does)');
if (!skip && !router && process.env.MBC_REQUIRE_MESH) throw new Error('MBC_ROUTER must name the live mesh\'s router');

test('Locate names the live instances of a bot', { skip: skipRouter }, async () => {
  const r = await call(mesh.router(router), 'Locate', { group: 'retail-bank', botId: 'cards' }, 10000);
  assert.ok(r.instances.length > 0 && r.instances[0].address, "cards' live instance");
  assert.equal(r.instances[0].group, 'retail-bank');
  await assert.rejects(call(mesh.router(router), 'Locate', { group: 'retail-bank', botId: 'nobody' }, 10000),
    (err) => err.code === grpc.status.NOT_FOUND);
  await assert.rejects(call(mesh.router(router), 'Locate', { group: 'retail-bank' }, 10000),
    (err) => err.code === grpc.status.INVALID_ARGUMENT);
});

// An owner instance that is gone (nothing listens at its address): the message goes to a live
// instance of the owner bot, located by the router, not to the entry bot.
test('a dead owner instance: a live one of its bot answers', { skip: skipRouter }, async (t) => {
  const dead = mesh.conversation({ entryAddress: entry, storeAddress: store, routerAddress: router, timeoutMs: 15000 });
  Object.assign(dead, { ownerAddress: '127.0.0.1:1', ownerBotId: 'cards', ownerGroup: 'retail-bank' });
  const r = await dead.send('my card got declined at the store');
  t.diagnostic(`owner ${r.owner.botId} at ${r.owner.address}: ${r.replies.map((x) => x.text).join(' | ')}`);
  assert.equal(r.outcome, 'OUTCOME_ANSWERED');
  assert.deepEqual([r.match.botId, r.match.intent], ['cards', 'card_declined']);
  assert.ok(r.replies.length > 0 && r.replies.every((reply) => reply.botId === 'cards'), "cards' answer only");
  assert.notEqual(dead.ownerAddress, '127.0.0.1:1');
  assert.equal(dead.ownerGroup, 'retail-bank');
});
