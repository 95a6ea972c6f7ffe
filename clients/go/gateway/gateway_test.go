package gateway_test

// Against a live mesh (the store, the router and the three example bots of examples/*.yaml), whose
// addresses come from the environment (scripts/polyglot_ci.sh starts one and sets them):
//
//	MBC_ENTRY_BOT  host:port of personal-banking, where the conversation starts
//	MBC_STORE      host:port of the Context Session Store
//	MBC_ROUTER     host:port of the router (the tests that locate a bot's instances)
//	MBC_REQUIRE_MESH=1 turns a missing address into a failure instead of a skip
//
// The messages are the demo's (mbc/cli/demo.py, SCRIPT).

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"mbc/clients/go/gateway"
	mbcv1 "mbc/clients/go/mbcv1"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func liveMesh(t *testing.T) (entry, store string) {
	entry, store = os.Getenv("MBC_ENTRY_BOT"), os.Getenv("MBC_STORE")
	if entry == "" || store == "" {
		if os.Getenv("MBC_REQUIRE_MESH") != "" {
			t.Fatal("MBC_ENTRY_BOT and MBC_STORE must name a live mesh")
		}
		t.Skip("no live mesh: set MBC_ENTRY_BOT and MBC_STORE (scripts/polyglot_ci.sh does)")
	}
	return entry, store
}

func send(t *testing.T, chat *gateway.Conversation, text string) *mbcv1.RespondResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	r, err := chat.Send(ctx, text)
	if err != nil {
		t.Fatalf("Send(%q): %v", text, err)
	}
	t.Logf("consumer > %s", text)
	for _, reply := range r.GetReplies() {
		t.Logf("  %s > %s", reply.GetBotId(), reply.GetText())
	}
	t.Logf("  [%s; match %s/%s %s; owner %s]", r.GetOutcome(), r.GetMatch().GetBotId(), r.GetMatch().GetIntent(), r.GetMatch().GetRating(), r.GetOwner().GetBotId())
	return r
}

func expectAnswered(t *testing.T, r *mbcv1.RespondResponse, botID, intent string) {
	t.Helper()
	if r.GetOutcome() != mbcv1.Outcome_OUTCOME_ANSWERED {
		t.Fatalf("outcome %s, want OUTCOME_ANSWERED", r.GetOutcome())
	}
	if intent != "" && (r.GetMatch().GetBotId() != botID || r.GetMatch().GetIntent() != intent) {
		t.Errorf("matched %s/%s, want %s/%s", r.GetMatch().GetBotId(), r.GetMatch().GetIntent(), botID, intent)
	}
	if len(r.GetReplies()) == 0 || r.GetReplies()[0].GetBotId() != botID || r.GetReplies()[0].GetText() == "" {
		t.Errorf("replies %v, want an answer from %s", r.GetReplies(), botID)
	}
	if r.GetOwner().GetBotId() != botID {
		t.Errorf("owner %s, want %s", r.GetOwner().GetBotId(), botID)
	}
}

func expectTransfer(t *testing.T, mesh *gateway.Mesh, store string, chat *gateway.Conversation, r *mbcv1.RespondResponse, from, to, toDisplayName, intent string) {
	t.Helper()
	if r.GetOutcome() != mbcv1.Outcome_OUTCOME_TRANSFERRED {
		t.Fatalf("outcome %s, want OUTCOME_TRANSFERRED", r.GetOutcome())
	}
	if r.GetMatch().GetBotId() != to || r.GetMatch().GetIntent() != intent {
		t.Errorf("transferred with %s/%s, want %s/%s", r.GetMatch().GetBotId(), r.GetMatch().GetIntent(), to, intent)
	}
	if r.GetTransferId() == "" {
		t.Error("no transfer id")
	}
	replies := r.GetReplies()
	if len(replies) < 2 {
		t.Fatalf("replies %v: want the sender's transfer message, then the receiver's answer", replies)
	}
	// The sender's transfer message names the receiver (its display name).
	if replies[0].GetBotId() != from || !strings.Contains(replies[0].GetText(), toDisplayName) {
		t.Errorf("first reply %s > %q: want %s's transfer message naming %q", replies[0].GetBotId(), replies[0].GetText(), from, toDisplayName)
	}
	if last := replies[len(replies)-1]; last.GetBotId() != to || last.GetText() == "" {
		t.Errorf("last reply %s > %q: want %s's answer", last.GetBotId(), last.GetText(), to)
	}
	if r.GetOwner().GetBotId() != to || r.GetOwner().GetAddress() == "" {
		t.Errorf("owner %v, want %s with its address", r.GetOwner(), to)
	}
	if chat.OwnerBotID != to {
		t.Errorf("the conversation follows %s, want %s", chat.OwnerBotID, to)
	}
	// The Context Session Store records the new owner.
	client, err := mesh.Store(store)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	owner, err := client.GetOwner(ctx, &mbcv1.GetOwnerRequest{ConversationId: chat.ID})
	if err != nil {
		t.Fatalf("GetOwner: %v", err)
	}
	if !owner.GetFound() || owner.GetOwnership().GetOwner().GetBotId() != to || owner.GetOwnership().GetTransferId() != r.GetTransferId() {
		t.Errorf("the store records %v, want %s by transfer %s", owner.GetOwnership(), to, r.GetTransferId())
	}
}

func TestConversationThroughTheMesh(t *testing.T) {
	entry, store := liveMesh(t)
	mesh := gateway.NewMesh()
	defer mesh.Close()
	chat := mesh.NewConversation(entry, store)
	chat.ConsumerID = "go-consumer"
	chat.ChannelMetadata = map[string]string{"channel": "go-test"}

	t.Run("local answer", func(t *testing.T) {
		expectAnswered(t, send(t, chat, "Hi there!"), "personal-banking", "greeting")
		expectAnswered(t, send(t, chat, "Sam"), "personal-banking", "")
		expectAnswered(t, send(t, chat, "What's the balance on my checking account?"), "personal-banking", "check_balance")
	})
	t.Run("transfer with intent and message", func(t *testing.T) {
		r := send(t, chat, "I just started a bakery. How do I open a business account for my LLC?")
		expectTransfer(t, mesh, store, chat, r, "personal-banking", "business-banking", "Business Banking Assistant", "open_business_account")
		// The new owner answers the next message itself.
		expectAnswered(t, send(t, chat, "Could my bookkeeper get her own login to our business account?"), "business-banking", "manage_business_users")
		r = send(t, chat, "Also, I think I lost my debit card yesterday")
		expectTransfer(t, mesh, store, chat, r, "business-banking", "cards", "Cards Assistant", "lost_or_stolen_card")
	})
	t.Run("fallback", func(t *testing.T) {
		r := send(t, chat, "Which pizza place near me delivers the fastest?")
		if r.GetOutcome() != mbcv1.Outcome_OUTCOME_FALLBACK {
			t.Fatalf("outcome %s, want OUTCOME_FALLBACK", r.GetOutcome())
		}
		if len(r.GetReplies()) != 1 || r.GetReplies()[0].GetBotId() != "cards" || r.GetReplies()[0].GetText() == "" {
			t.Errorf("replies %v, want the fallback of cards, the owner", r.GetReplies())
		}
		if r.GetOwner().GetBotId() != "cards" || r.GetMatch().GetIntent() != "" {
			t.Errorf("owner %s, intent %q: want cards and no intent", r.GetOwner().GetBotId(), r.GetMatch().GetIntent())
		}
	})
}

func TestServiceConfigIsTheRepositorys(t *testing.T) {
	want, err := os.ReadFile("../../../protos/service_config.json")
	if err != nil {
		t.Skipf("protos/service_config.json not found (a copy of clients/go outside the repository): %v", err)
	}
	if string(want) != gateway.ServiceConfig {
		t.Fatal("gateway/service_config.json differs from protos/service_config.json: copy it again")
	}
}

func liveRouter(t *testing.T) string {
	router := os.Getenv("MBC_ROUTER")
	if router == "" {
		if os.Getenv("MBC_REQUIRE_MESH") != "" {
			t.Fatal("MBC_ROUTER must name the live mesh's router")
		}
		t.Skip("no live router: set MBC_ROUTER (scripts/polyglot_ci.sh does)")
	}
	return router
}

func TestLocateNamesTheLiveInstancesOfABot(t *testing.T) {
	liveMesh(t)
	router := liveRouter(t)
	mesh := gateway.NewMesh()
	defer mesh.Close()
	client, err := mesh.Router(router)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := client.Locate(ctx, &mbcv1.LocateRequest{Group: "retail-bank", BotId: "cards"})
	if err != nil {
		t.Fatalf("Locate: %v", err)
	}
	if len(r.GetInstances()) == 0 || r.GetInstances()[0].GetAddress() == "" || r.GetInstances()[0].GetGroup() != "retail-bank" {
		t.Errorf("instances %v, want cards' live instance", r.GetInstances())
	}
	_, err = client.Locate(ctx, &mbcv1.LocateRequest{Group: "retail-bank", BotId: "nobody"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("Locate(nobody): %v, want NOT_FOUND", err)
	}
	_, err = client.Locate(ctx, &mbcv1.LocateRequest{Group: "retail-bank"})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("Locate without bot_id: %v, want INVALID_ARGUMENT", err)
	}
}

// An owner instance that is gone (nothing listens at its address): the message goes to a live
// instance of the owner bot, located by the router, not to the entry bot.
func TestDeadOwnerInstanceALiveOneOfItsBotAnswers(t *testing.T) {
	entry, store := liveMesh(t)
	router := liveRouter(t)
	mesh := gateway.NewMesh()
	defer mesh.Close()
	chat := mesh.NewConversation(entry, store)
	chat.RouterAddress = router
	chat.OwnerAddress, chat.OwnerBotID, chat.OwnerGroup = "127.0.0.1:1", "cards", "retail-bank"
	r := send(t, chat, "my card got declined at the store")
	expectAnswered(t, r, "cards", "card_declined")
	if slices.ContainsFunc(r.GetReplies(), func(reply *mbcv1.Reply) bool { return reply.GetBotId() != "cards" }) {
		t.Errorf("replies %v: want cards' answer only, not through the entry bot", r.GetReplies())
	}
	if chat.OwnerAddress == "127.0.0.1:1" || chat.OwnerGroup != "retail-bank" {
		t.Errorf("the conversation follows %s (group %q), want cards' live instance", chat.OwnerAddress, chat.OwnerGroup)
	}
}
