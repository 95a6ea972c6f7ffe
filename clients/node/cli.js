#!/usr/bin/env node
'use strict';
// A small channel gateway: sends a conversation through the mbc mesh and prints every reply, the
// bot that sent it, and each hand-over.
//
//   node cli.js --entry 127.0.0.1:50061 --store 127.0.0.1:50052 --router 127.0.0.1:50051 "Hi there!" "I lost my card"
//
// Without messages it sends the demo's conversation.
const { parseArgs } = require('node:util');
const { Mesh } = require('./gateway');

const DEMO = [
  'Hi there!',
  'Sam',
  "What's the balance on my checking account?",
  'I just started a bakery. How do I open a business account for my LLC?',
  'Could my bookkeeper get her own login to our business account?',
  'Also, I think I lost my debit card yesterday',
  'Which pizza place near me delivers the fastest?',
];

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      entry: { type: 'string', default: '127.0.0.1:50061' },
      store: { type: 'string', default: '' },
      router: { type: 'string', default: '' },
      consumer: { type: 'string', default: 'consumer-42' },
    },
  });
  const mesh = new Mesh();
  const chat = mesh.conversation({ entryAddress: values.entry, storeAddress: values.store, routerAddress: values.router, consumerId: values.consumer,
    channelMetadata: { channel: 'node-gateway' } });
  console.log(`conversation ${chat.conversationId}`);
  try {
    for (const text of positionals.length ? positionals : DEMO) {
      const r = await chat.send(text);
      console.log(`consumer > ${text}`);
      for (const reply of r.replies) console.log(`  ${reply.botId} > ${reply.text}`);
      if (r.outcome === 'OUTCOME_TRANSFERRED') console.log(`    [handed over to ${r.owner.botId} for ${r.match.intent}: it owns the conversation now]`);
      if (r.outcome === 'OUTCOME_FALLBACK') console.log(`    [no bot has an intent for this: ${r.owner.botId}'s fallback]`);
    }
  } finally {
    mesh.close();
  }
}

main().catch((err) => { console.error(`gateway: ${err.message}`); process.exit(1); });
