// Command webhook serves cert-manager's admission webhook: validation and defaulting of its
// resources, and the identity and approval checks of CertificateRequests, over TLS with a
// certificate it makes from a CA of its own kept in a Secret (--dynamic-serving-*), or from
// files (--tls-cert-file, --tls-private-key-file).
//
// The server, its admission chain and its configuration are cert-manager's
// (internal/webhook, pkg/webhook/options); this package parses the flags, applies logging and
// feature gates, and runs it until SIGINT or SIGTERM. The flags are upstream's, so the
// Deployment of cert-manager's chart runs it unchanged; a --config file is not supported.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/cert-manager/cert-manager/internal/apis/config/webhook/validation"
	cmwebhook "github.com/cert-manager/cert-manager/internal/webhook"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
	"github.com/cert-manager/cert-manager/pkg/util"
	utilfeature "github.com/cert-manager/cert-manager/pkg/util/feature"
	"github.com/cert-manager/cert-manager/pkg/webhook/options"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	logf.InitLogs()
	defer logf.FlushLogs()

	cfg, err := options.NewWebhookConfiguration()
	if err != nil {
		fmt.Fprintln(os.Stderr, "webhook: default configuration:", err)
		return 1
	}
	fs := pflag.NewFlagSet("webhook", pflag.ContinueOnError)
	options.AddConfigFlags(fs, cfg)
	printVersion := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "cert-manager webhook %s (dkv build): validates and defaults cert-manager's resources.\n\nFlags:\n%s",
			util.AppVersion, fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(os.Stderr, "webhook:", err)
		return 2
	}
	if *printVersion {
		v := util.VersionInfo()
		fmt.Printf("cert-manager webhook %s (commit %s, %s, %s)\n", v.GitVersion, v.GitCommit, v.GoVersion, v.Platform)
		return 0
	}
	if err := utilfeature.DefaultMutableFeatureGate.SetFromMap(cfg.FeatureGates); err != nil {
		fmt.Fprintln(os.Stderr, "webhook: --feature-gates:", err)
		return 2
	}
	if errs := validation.ValidateWebhookConfiguration(cfg, nil); len(errs) > 0 {
		fmt.Fprintln(os.Stderr, "webhook:", errs.ToAggregate())
		return 2
	}
	if err := logf.ValidateAndApply(&cfg.Logging); err != nil {
		fmt.Fprintln(os.Stderr, "webhook: logging flags:", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	log := logf.FromContext(logf.NewContext(ctx, logf.Log, "webhook"))
	log.Info("starting cert-manager webhook (dkv build)", "version", util.AppVersion)
	srv, err := cmwebhook.NewCertManagerWebhookServer(log, *cfg)
	if err == nil {
		err = srv.Run(ctx)
	}
	if err != nil {
		log.Error(err, "webhook stopped")
		return 1
	}
	return 0
}
