'use strict';
// A starting point for a channel gateway written in Node.js: sends the messages of a conversation
// to the bot that owns it, through the mbc mesh.
//
//   const { Mesh } = require('./gateway');
//   const mesh = new Mesh();
//   const chat = mesh.conversation({ entryAddress: '127.0.0.1:50061', storeAddress: '127.0.0.1:50052',
//     routerAddress: '127.0.0.1:50051' });
//   const r = await chat.send('I lost my card');
//   for (const reply of r.replies) console.log(reply.botId, reply.text);
//   mesh.close();
//
// The contracts are loaded at run time from protos/ (MBC_PROTOS overrides the directory), with the
// mesh's service config (protos/service_config.json: per-method timeouts, retries of UNAVAILABLE
// only). Each response names the owner of the conversation (the bot: group and bot id, and the
// instance's address), and the next message goes there; with a store address, a gateway that does
// not know the owner asks the Context Session Store. When the owner instance cannot be reached
// (UNAVAILABLE) or refuses the conversation (FAILED_PRECONDITION) and the store names no other
// instance, a conversation with a routerAddress asks a router to Locate a live instance of the owner
// bot and sends there; with no router, or no live instance, the entry bot takes it over.

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = process.env.MBC_PROTOS || path.resolve(__dirname, '..', '..', 'protos');

// Enums as names ('OUTCOME_TRANSFERRED'), 64-bit integers as strings, camelCase fields
// (conversationId), unset fields with their defaults: the usual grpc-js choices.
const packageDefinition = protoLoader.loadSync(
  ['mbc/v1/bot.proto', 'mbc/v1/router.proto', 'mbc/v1/context.proto'],
  { includeDirs: [PROTOS], keepCase: false, longs: String, enums: String, defaults: true, oneofs: true },
);
const mbc = grpc.loadPackageDefinition(packageDefinition).mbc.v1;
const serviceConfig = fs.readFileSync(path.join(PROTOS, 'service_config.json'), 'utf8');

function call(client, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// One client per (service, address), all with the service config; close them with close().
class Mesh {
  constructor({ credentials = grpc.credentials.createInsecure(), options = {} } = {}) {
    this.credentials = credentials;
    this.options = { 'grpc.service_config': serviceConfig, ...options };
    this.clients = new Map();
  }

  client(Service, address) {
    const key = `${Service.serviceName}@${address}`;
    if (!this.clients.has(key)) this.clients.set(key, new Service(address, this.credentials, this.options));
    return this.clients.get(key);
  }

  bot(address) { return this.client(mbc.Bot, address); }
  router(address) { return this.client(mbc.Router, address); }
  store(address) { return this.client(mbc.ContextStore, address); }

  conversation(options) { return new Conversation(this, options); }

  close() {
    for (const client of this.clients.values()) client.close();
    this.clients.clear();
  }
}

// How many addresses a message is sent to at most: the owner, then where the store, a router or
// the entry bot point.
const MAX_SENDS = 4;

class Conversation {
  constructor(mesh, { entryAddress, entryBotId = '', storeAddress = '', routerAddress = '', conversationId = crypto.randomUUID().replaceAll('-', ''),
    consumerId = '', channelMetadata = {}, timeoutMs = 10000 }) {
    Object.assign(this, { mesh, entryAddress, entryBotId, storeAddress, routerAddress, conversationId, consumerId, channelMetadata, timeoutMs });
    this.ownerAddress = '';
    this.ownerBotId = '';
    this.ownerGroup = '';
  }

  // The owner the store names ({ address, botId }), else the entry bot (botId '': its address's only bot).
  async findOwner() {
    if (this.storeAddress) {
      const r = await call(this.mesh.store(this.storeAddress), 'GetOwner', { conversationId: this.conversationId }, this.timeoutMs);
      if (r.found && r.ownership.owner.address) {
        this.ownerBotId = r.ownership.owner.botId;
        this.ownerGroup = r.ownership.owner.group;
        return { address: r.ownership.owner.address, botId: r.ownership.owner.botId };
      }
    }
    return { address: this.entryAddress, botId: this.entryBotId };
  }

  // A live instance ({ address, botId }) of the owner bot not in `failed`, per the router; null with
  // no router, no known owner, no such instance, or no answer (the router's error is not the message's).
  async liveInstance(failed) {
    if (!this.routerAddress || !this.ownerBotId) return null;
    try {
      const r = await call(this.mesh.router(this.routerAddress), 'Locate', { group: this.ownerGroup, botId: this.ownerBotId }, this.timeoutMs);
      const live = r.instances.find((i) => !failed.includes(i.address));
      return live ? { address: live.address, botId: live.botId } : null;
    } catch {
      return null;
    }
  }

  // Where to send a message once more after `err` from the last of `failed` (null: nowhere). Refused
  // (another bot or instance holds it): where the store says now, unless that failed, then a live
  // instance of the owner bot. Unreachable, or no longer hosted there (NOT_FOUND): a live instance
  // of its bot, else the entry bot.
  async sendAgainTo(err, failed) {
    if (err.code === grpc.status.FAILED_PRECONDITION && this.storeAddress) {
      const owner = await this.findOwner();
      return failed.includes(owner.address) ? this.liveInstance(failed) : owner;
    }
    if (err.code === grpc.status.UNAVAILABLE || err.code === grpc.status.NOT_FOUND) {
      const live = await this.liveInstance(failed);
      if (live) return live;
      if (!failed.includes(this.entryAddress)) return { address: this.entryAddress, botId: this.entryBotId };
    }
    return null;
  }

  // Sends one consumer message; resolves to the RespondResponse (replies, owner, outcome, match...).
  // The message names the owner's bot (an address may host several bots).
  async send(text) {
    let target = this.ownerAddress ? { address: this.ownerAddress, botId: this.ownerBotId } : await this.findOwner();
    const failed = [];
    for (;;) {
      const request = { conversationId: this.conversationId, consumerId: this.consumerId, text,
        channelMetadata: this.channelMetadata, botId: target.botId };
      let response;
      try {
        response = await call(this.mesh.bot(target.address), 'Respond', request, this.timeoutMs);
      } catch (err) {
        failed.push(target.address);
        const next = failed.length < MAX_SENDS ? await this.sendAgainTo(err, failed) : null;
        if (!next) throw err;
        target = next;
        continue;
      }
      if (response.owner && response.owner.address) {
        this.ownerAddress = response.owner.address;
        this.ownerBotId = response.owner.botId;
        this.ownerGroup = response.owner.group;
      }
      return response;
    }
  }
}

module.exports = { Mesh, Conversation, call, mbc, grpc, serviceConfig, PROTOS };
