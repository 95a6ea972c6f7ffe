// Package gateway is a starting point for a channel gateway written in Go: it sends the messages of
// a conversation to the bot that owns it, through the mbc mesh.
//
//	mesh := gateway.NewMesh()
//	defer mesh.Close()
//	chat := mesh.NewConversation(entryBotAddress, storeAddress)
//	resp, err := chat.Send(ctx, "I lost my card")
//	for _, r := range resp.GetReplies() { fmt.Println(r.GetBotId(), r.GetText()) }
//
// Each response names the owner of the conversation (the bot: group and bot id, and the
// instance's address), and the next message goes there. With a store address, a gateway that does
// not know the owner (another replica took the previous message, or it restarted) asks the Context
// Session Store; a new conversation goes to the entry bot. When the owner instance cannot be
// reached (UNAVAILABLE) or refuses the conversation (FAILED_PRECONDITION) and the store names no
// other instance, a Conversation with a RouterAddress asks a router to Locate a live instance of the
// owner bot and sends there; with no router, or no live instance, the entry bot takes the
// conversation over. Every connection uses the mesh's service config (service_config.json, a copy
// of protos/service_config.json): per-method timeouts and retries of UNAVAILABLE only.
package gateway

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
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
	target := address
	if !strings.Contains(address, ":///") {
		target = "dns:///" + address
	}
	conn, err := grpc.NewClient(target, m.opts...)
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

// Router returns a client of the mbc.v1.Router service at address (host:port or a gRPC target
// such as dns:///routers.mesh:50051).
func (m *Mesh) Router(address string) (mbcv1.RouterClient, error) {
	conn, err := m.Conn(address)
	if err != nil {
		return nil, err
	}
	return mbcv1.NewRouterClient(conn), nil
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
	// EntryBotID names the entry bot when its address hosts several bots; empty: the address's only bot.
	EntryBotID string
	// StoreAddress of the Context Session Store; empty: rely on the responses' owners only.
	StoreAddress string
	// RouterAddress of a router (host:port or a gRPC target); empty: a dead owner instance's
	// conversation goes to the entry bot, never to a sibling instance of the owner bot.
	RouterAddress string
	// OwnerAddress, OwnerBotID and OwnerGroup: the owner named by the last response (or the store).
	OwnerAddress string
	OwnerBotID   string
	OwnerGroup   string

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

// findOwner is the owner the store names (address and bot id), else the entry bot ("": its
// address's only bot).
func (c *Conversation) findOwner(ctx context.Context) (string, string, error) {
	if c.StoreAddress != "" {
		store, err := c.mesh.Store(c.StoreAddress)
		if err != nil {
			return "", "", err
		}
		r, err := store.GetOwner(ctx, &mbcv1.GetOwnerRequest{ConversationId: c.ID})
		if err != nil {
			return "", "", fmt.Errorf("asking the store who owns %s: %w", c.ID, err)
		}
		if owner := r.GetOwnership().GetOwner(); r.GetFound() && owner.GetAddress() != "" {
			c.OwnerBotID = owner.GetBotId()
			c.OwnerGroup = owner.GetGroup()
			return owner.GetAddress(), owner.GetBotId(), nil
		}
	}
	return c.EntryAddress, c.EntryBotID, nil
}

// maxSends is how many addresses a message is sent to at most: the owner, then where the store,
// a router or the entry bot point.
const maxSends = 4

// Send sends one consumer message to the owner of the conversation and returns its response
// (the replies to show, in order, and the owner for the next message). The message names the
// owner's bot (an address may host several bots).
func (c *Conversation) Send(ctx context.Context, text string) (*mbcv1.RespondResponse, error) {
	request := &mbcv1.RespondRequest{
		ConversationId:  c.ID,
		ConsumerId:      c.ConsumerID,
		Text:            text,
		ChannelMetadata: c.ChannelMetadata,
	}
	address, botID := c.OwnerAddress, c.OwnerBotID
	if address == "" {
		var err error
		if address, botID, err = c.findOwner(ctx); err != nil {
			return nil, err
		}
	}
	var failed []string
	for {
		request.BotId = botID
		response, err := c.respond(ctx, address, request)
		if err == nil {
			if owner := response.GetOwner(); owner.GetAddress() != "" {
				c.OwnerAddress = owner.GetAddress()
				c.OwnerBotID = owner.GetBotId()
				c.OwnerGroup = owner.GetGroup()
			}
			return response, nil
		}
		failed = append(failed, address)
		if len(failed) >= maxSends {
			return nil, err
		}
		next, nextBot, nextErr := c.sendAgainTo(ctx, err, failed)
		if nextErr != nil {
			return nil, nextErr
		}
		if next == "" {
			return nil, err
		}
		address, botID = next, nextBot
	}
}

// sendAgainTo is where (address, bot id) to send a message once more after err from the last of
// failed ("": nowhere). The instance refused the conversation: where the store says now, unless
// that is where it failed, then a live instance of the owner bot. The owner cannot be reached, or
// its address no longer hosts it (NOT_FOUND): a live instance of its bot, else the entry bot,
// which takes over a conversation whose owner instance is gone.
func (c *Conversation) sendAgainTo(ctx context.Context, err error, failed []string) (string, string, error) {
	switch status.Code(err) {
	case codes.FailedPrecondition:
		if c.StoreAddress == "" {
			return "", "", nil
		}
		address, botID, err := c.findOwner(ctx)
		if err != nil {
			return "", "", err
		}
		if !slices.Contains(failed, address) {
			return address, botID, nil
		}
		address, botID = c.liveInstance(ctx, failed)
		return address, botID, nil
	case codes.Unavailable, codes.NotFound:
		if address, botID := c.liveInstance(ctx, failed); address != "" {
			return address, botID, nil
		}
		if !slices.Contains(failed, c.EntryAddress) {
			return c.EntryAddress, c.EntryBotID, nil
		}
	}
	return "", "", nil
}

// liveInstance asks the router for a live instance of the owner bot not in failed (its address
// and bot id); "" with no router, no known owner, no such instance, or no answer (the router's
// error is not the message's).
func (c *Conversation) liveInstance(ctx context.Context, failed []string) (string, string) {
	if c.RouterAddress == "" || c.OwnerBotID == "" {
		return "", ""
	}
	router, err := c.mesh.Router(c.RouterAddress)
	if err != nil {
		return "", ""
	}
	r, err := router.Locate(ctx, &mbcv1.LocateRequest{Group: c.OwnerGroup, BotId: c.OwnerBotID})
	if err != nil {
		return "", ""
	}
	for _, instance := range r.GetInstances() {
		if !slices.Contains(failed, instance.GetAddress()) {
			return instance.GetAddress(), instance.GetBotId()
		}
	}
	return "", ""
}

func (c *Conversation) respond(ctx context.Context, address string, request *mbcv1.RespondRequest) (*mbcv1.RespondResponse, error) {
	bot, err := c.mesh.Bot(address)
	if err != nil {
		return nil, err
	}
	return bot.Respond(ctx, request)
}
