// Package gateway is a starting point for a channel gateway written in Go: it sends the messages of
// a conversation to the bot that owns it, through the mbc mesh.
//
//	mesh := gateway.NewMesh()
//	defer mesh.Close()
//	chat := mesh.NewConversation(entryBotAddress, storeAddress)
//	resp, err := chat.Send(ctx, "I lost my card")
//	for _, r := range resp.GetReplies() { fmt.Println(r.GetBotId(), r.GetText()) }
//
// Each response names the owner of the conversation, and the next message goes there. With a
// store address, a gateway that does not know the owner (another replica took the previous
// message, or it restarted) asks the Context Session Store; a new conversation goes to the entry
// bot. Every connection uses the mesh's service config (service_config.json, a copy of
// protos/service_config.json): per-method timeouts and retries of UNAVAILABLE only.
package gateway

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	mbcv1 "mbc/clients/go/mbcv1"
)

// ServiceConfig is the mesh's retry and timeout service config (protos/service_config.json).
//
//go:embed service_config.json
var ServiceConfig string

// Mesh keeps one client connection per address (bots, the router, the store).
type Mesh struct {
	mu    sync.Mutex
	opts  []grpc.DialOption
	conns map[string]*grpc.ClientConn
}

// NewMesh returns a Mesh whose connections are plaintext and use ServiceConfig; extra options
// (credentials, interceptors...) are added after those.
func NewMesh(opts ...grpc.DialOption) *Mesh {
	base := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(ServiceConfig),
	}
	return &Mesh{opts: append(base, opts...), conns: map[string]*grpc.ClientConn{}}
}

// Conn returns the connection to address ("host:port"), opening it on first use.
func (m *Mesh) Conn(address string) (*grpc.ClientConn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if conn, ok := m.conns[address]; ok {
		return conn, nil
	}
	conn, err := grpc.NewClient("dns:///"+address, m.opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", address, err)
	}
	m.conns[address] = conn
	return conn, nil
}

// Bot returns a client of the mbc.v1.Bot service at address.
func (m *Mesh) Bot(address string) (mbcv1.BotClient, error) {
	conn, err := m.Conn(address)
	if err != nil {
		return nil, err
	}
	return mbcv1.NewBotClient(conn), nil
}

// Store returns a client of the mbc.v1.ContextStore service at address.
func (m *Mesh) Store(address string) (mbcv1.ContextStoreClient, error) {
	conn, err := m.Conn(address)
	if err != nil {
		return nil, err
	}
	return mbcv1.NewContextStoreClient(conn), nil
}

// Close closes every connection.
func (m *Mesh) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var first error
	for address, conn := range m.conns {
		if err := conn.Close(); err != nil && first == nil {
			first = err
		}
		delete(m.conns, address)
	}
	return first
}

// Conversation is one consumer conversation; Send its messages in order.
type Conversation struct {
	// ID of the conversation (random when created by NewConversation).
	ID string
	// ConsumerID is passed with every message; optional.
	ConsumerID string
	// ChannelMetadata (channel name, locale...) is passed with every message.
	ChannelMetadata map[string]string
	// EntryAddress is the bot that gets a conversation nobody owns yet.
	EntryAddress string
	// StoreAddress of the Context Session Store; empty: rely on the responses' owners only.
	StoreAddress string
	// OwnerAddress and OwnerBotID: the owner named by the last response (or the store).
	OwnerAddress string
	OwnerBotID   string

	mesh *Mesh
}

// NewConversation starts a conversation with a new random id.
func (m *Mesh) NewConversation(entryAddress, storeAddress string) *Conversation {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		panic(err)
	}
	return &Conversation{ID: hex.EncodeToString(id), EntryAddress: entryAddress, StoreAddress: storeAddress, mesh: m}
}

func (c *Conversation) findOwner(ctx context.Context) (string, error) {
	if c.StoreAddress != "" {
		store, err := c.mesh.Store(c.StoreAddress)
		if err != nil {
			return "", err
		}
		r, err := store.GetOwner(ctx, &mbcv1.GetOwnerRequest{ConversationId: c.ID})
		if err != nil {
			return "", fmt.Errorf("asking the store who owns %s: %w", c.ID, err)
		}
		if r.GetFound() && r.GetOwnership().GetOwner().GetAddress() != "" {
			c.OwnerBotID = r.GetOwnership().GetOwner().GetBotId()
			return r.GetOwnership().GetOwner().GetAddress(), nil
		}
	}
	return c.EntryAddress, nil
}

// Send sends one consumer message to the owner of the conversation and returns its response
// (the replies to show, in order, and the owner for the next message).
func (c *Conversation) Send(ctx context.Context, text string) (*mbcv1.RespondResponse, error) {
	request := &mbcv1.RespondRequest{
		ConversationId:  c.ID,
		ConsumerId:      c.ConsumerID,
		Text:            text,
		ChannelMetadata: c.ChannelMetadata,
	}
	address := c.OwnerAddress
	if address == "" {
		var err error
		if address, err = c.findOwner(ctx); err != nil {
			return nil, err
		}
	}
	response, err := c.respond(ctx, address, request)
	if status.Code(err) == codes.FailedPrecondition && c.StoreAddress != "" {
		// Someone else moved the conversation: ask the store where it is now, once.
		if address, err = c.findOwner(ctx); err != nil {
			return nil, err
		}
		response, err = c.respond(ctx, address, request)
	}
	if err != nil {
		return nil, err
	}
	if owner := response.GetOwner(); owner.GetAddress() != "" {
		c.OwnerAddress = owner.GetAddress()
		c.OwnerBotID = owner.GetBotId()
	}
	return response, nil
}

func (c *Conversation) respond(ctx context.Context, address string, request *mbcv1.RespondRequest) (*mbcv1.RespondResponse, error) {
	bot, err := c.mesh.Bot(address)
	if err != nil {
		return nil, err
	}
	return bot.Respond(ctx, request)
}
