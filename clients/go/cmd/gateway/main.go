// Command gateway is a small channel gateway: it sends a conversation through the mbc mesh and
// prints every reply, the bot that sent it, and each hand-over.
//
//	go run ./cmd/gateway -entry 127.0.0.1:50061 -store 127.0.0.1:50052 "Hi there!" "I lost my card"
//
// Without messages it sends the demo's conversation; with "-" it reads one message per line from
// standard input.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"mbc/clients/go/gateway"
	mbcv1 "mbc/clients/go/mbcv1"
)

var demo = []string{
	"Hi there!",
	"Sam",
	"What's the balance on my checking account?",
	"I just started a bakery. How do I open a business account for my LLC?",
	"Could my bookkeeper get her own login to our business account?",
	"Also, I think I lost my debit card yesterday",
	"Which pizza place near me delivers the fastest?",
}

func main() {
	entry := flag.String("entry", "127.0.0.1:50061", "host:port of the bot that starts the conversation")
	store := flag.String("store", "", "host:port of the Context Session Store (optional: find the owner of a known conversation)")
	router := flag.String("router", "", "a router (host:port or a gRPC target; optional: when the owner instance is gone, send to a live instance of its bot)")
	conversation := flag.String("conversation", "", "conversation id (default: a new random one)")
	consumer := flag.String("consumer", "consumer-42", "consumer id")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of each message")
	flag.Parse()

	messages := flag.Args()
	if len(messages) == 0 {
		messages = demo
	} else if len(messages) == 1 && messages[0] == "-" {
		messages = nil
		scanner := bufio.NewScanner(os.Stdin)
		for scanner.Scan() {
			if line := scanner.Text(); line != "" {
				messages = append(messages, line)
			}
		}
	}

	mesh := gateway.NewMesh()
	defer mesh.Close()
	chat := mesh.NewConversation(*entry, *store)
	chat.RouterAddress = *router
	if *conversation != "" {
		chat.ID = *conversation
	}
	chat.ConsumerID = *consumer
	chat.ChannelMetadata = map[string]string{"channel": "go-gateway"}
	fmt.Printf("conversation %s\n", chat.ID)
	for _, text := range messages {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		r, err := chat.Send(ctx, text)
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "gateway: %v\n", err)
			os.Exit(1)
		}
		fmt.Printf("consumer > %s\n", text)
		for _, reply := range r.GetReplies() {
			fmt.Printf("  %s > %s\n", reply.GetBotId(), reply.GetText())
		}
		m := r.GetMatch()
		switch r.GetOutcome() {
		case mbcv1.Outcome_OUTCOME_TRANSFERRED:
			fmt.Printf("    [handed over to %s for %s (%s): it owns the conversation now]\n", r.GetOwner().GetBotId(), m.GetIntent(), m.GetRating())
		case mbcv1.Outcome_OUTCOME_FALLBACK:
			fmt.Printf("    [no bot has an intent for this: %s's fallback]\n", r.GetOwner().GetBotId())
		case mbcv1.Outcome_OUTCOME_CLARIFY:
			for i, o := range r.GetOptions() {
				fmt.Printf("    [option %d: %s]\n", i+1, o.GetLabel())
			}
		}
	}
}
