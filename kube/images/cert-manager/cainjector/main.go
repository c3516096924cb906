// Command cainjector copies CA certificates into the caBundle fields of webhook
// configurations, APIServices and CustomResourceDefinitions annotated with
// cert-manager.io/inject-ca-from (a Certificate), cert-manager.io/inject-ca-from-secret or
// cert-manager.io/inject-apiserver-ca.
//
// cert-manager's own command is a nested Go module that the module proxy does not serve, so
// this main package wires the exported injector of github.com/cert-manager/cert-manager
// (pkg/controller/cainjector) into a controller-runtime manager itself. The flags keep the
// names of cert-manager's cainjector, so the Deployment its Helm chart renders runs this
// binary unchanged.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	kscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	logsapi "k8s.io/component-base/logs/api/v1"
	apireg "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	cmscheme "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned/scheme"
	"github.com/cert-manager/cert-manager/pkg/controller/cainjector"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
	"github.com/cert-manager/cert-manager/pkg/util"
)

type settings struct {
	master, kubeconfig, namespace string
	leaderElect                   bool
	leaderNS                      string
	leaseDuration, renewDL, retry time.Duration
	metricsAddr                   string
	fromCertificates              bool
	inject                        map[string]*bool
	printVersion                  bool
	logging                       *logsapi.LoggingConfiguration
}

func newFlags(s *settings) *pflag.FlagSet {
	fs := pflag.NewFlagSet("cainjector", pflag.ContinueOnError)
	fs.StringVar(&s.master, "master", "", "API server address (default: from the kubeconfig or the pod's service account)")
	fs.StringVar(&s.kubeconfig, "kubeconfig", "", "kubeconfig file; empty: in-cluster configuration")
	fs.StringVar(&s.namespace, "namespace", "", "only inject into resources of this namespace; empty: all")
	fs.BoolVar(&s.leaderElect, "leader-elect", true, "hold the cert-manager-cainjector-leader-election Lease before injecting")
	fs.StringVar(&s.leaderNS, "leader-election-namespace", "kube-system", "namespace of the Lease")
	fs.DurationVar(&s.leaseDuration, "leader-election-lease-duration", 60*time.Second, "Lease duration")
	fs.DurationVar(&s.renewDL, "leader-election-renew-deadline", 40*time.Second, "how long the leader keeps trying to renew")
	fs.DurationVar(&s.retry, "leader-election-retry-period", 15*time.Second, "interval between attempts to acquire or renew")
	fs.StringVar(&s.metricsAddr, "metrics-listen-address", "0.0.0.0:9402", "address of the Prometheus metrics endpoint; 0 turns it off")
	fs.BoolVar(&s.fromCertificates, "enable-certificates-data-source", true, "read CAs from Certificates (cert-manager.io/inject-ca-from)")
	s.inject = map[string]*bool{}
	for flag, kind := range map[string]string{
		"enable-mutatingwebhookconfigurations-injectable":   cainjector.MutatingWebhookConfigurationName,
		"enable-validatingwebhookconfigurations-injectable": cainjector.ValidatingWebhookConfigurationName,
		"enable-apiservices-injectable":                     cainjector.APIServiceName,
		"enable-customresourcedefinitions-injectable":       cainjector.CustomResourceDefinitionName,
	} {
		s.inject[kind] = fs.Bool(flag, true, "inject into "+kind+"s")
	}
	fs.BoolVar(&s.printVersion, "version", false, "print the version and exit")
	s.logging = logsapi.NewLoggingConfiguration()
	logf.AddFlags(s.logging, fs)
	return fs
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	logf.InitLogs()
	defer logf.FlushLogs()

	s := &settings{}
	fs := newFlags(s)
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "cert-manager cainjector %s (dkv build): injects CA bundles.\n\nFlags:\n%s",
			util.AppVersion, fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(os.Stderr, "cainjector:", err)
		return 2
	}
	if s.printVersion {
		v := util.VersionInfo()
		fmt.Printf("cert-manager cainjector %s (commit %s, %s, %s)\n", v.GitVersion, v.GitCommit, v.GoVersion, v.Platform)
		return 0
	}
	if err := logf.ValidateAndApply(s.logging); err != nil {
		fmt.Fprintln(os.Stderr, "cainjector: logging flags:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx = logf.NewContext(ctx, logf.Log, "cainjector")
	if err := serve(ctx, s); err != nil {
		logf.FromContext(ctx).Error(err, "cainjector stopped")
		return 1
	}
	return 0
}

func serve(ctx context.Context, s *settings) error {
	log := logf.FromContext(ctx)
	log.Info("starting cert-manager cainjector (dkv build)", "version", util.AppVersion)
	ctrl.SetLogger(log)

	cfg, err := clientcmd.BuildConfigFromFlags(s.master, s.kubeconfig)
	if err != nil {
		return fmt.Errorf("client configuration: %w", err)
	}
	cfg = util.RestConfigWithUserAgent(cfg, "cainjector")

	scheme := runtime.NewScheme()
	utilruntime.Must(kscheme.AddToScheme(scheme))
	utilruntime.Must(cmscheme.AddToScheme(scheme))
	utilruntime.Must(apiext.AddToScheme(scheme))
	utilruntime.Must(apireg.AddToScheme(scheme))

	var namespaces map[string]cache.Config
	if s.namespace != "" {
		namespaces = map[string]cache.Config{s.namespace: {}}
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme: scheme,
		Cache:  cache.Options{ReaderFailOnMissingInformer: true, DefaultNamespaces: namespaces},
		// Secrets are read directly, never cached: a cluster's Secrets can be many and large,
		// and only the few that injectables name are wanted.
		Client:                        client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}},
		LeaderElection:                s.leaderElect,
		LeaderElectionNamespace:       s.leaderNS,
		LeaderElectionID:              "cert-manager-cainjector-leader-election",
		LeaderElectionReleaseOnCancel: true,
		LeaderElectionResourceLock:    resourcelock.LeasesResourceLock,
		LeaseDuration:                 &s.leaseDuration,
		RenewDeadline:                 &s.renewDL,
		RetryPeriod:                   &s.retry,
		Metrics:                       metricsserver.Options{BindAddress: s.metricsAddr},
	})
	if err != nil {
		return fmt.Errorf("controller manager: %w", err)
	}

	if s.fromCertificates {
		// The Certificate CRD may be applied after this pod starts (same manifest): wait
		// for it rather than fail, as the injectors watch Certificates.
		direct, err := client.New(mgr.GetConfig(), client.Options{Scheme: scheme, Mapper: mgr.GetRESTMapper()})
		if err != nil {
			return err
		}
		err = wait.PollUntilContextTimeout(ctx, time.Second, 5*time.Minute, true, func(ctx context.Context) (bool, error) {
			err := direct.Get(ctx, types.NamespacedName{Name: "certificates.cert-manager.io"}, &apiext.CustomResourceDefinition{})
			if apierrors.IsNotFound(err) {
				log.Info("waiting for the CustomResourceDefinition certificates.cert-manager.io")
				return false, nil
			}
			return err == nil, err
		})
		if err != nil {
			return fmt.Errorf("CustomResourceDefinition certificates.cert-manager.io: %w", err)
		}
	}

	enabled := map[string]bool{}
	for kind, on := range s.inject {
		enabled[kind] = *on
	}
	if err := cainjector.RegisterAllInjectors(ctx, mgr, cainjector.SetupOptions{
		Namespace:                    s.namespace,
		EnableCertificatesDataSource: s.fromCertificates,
		EnabledReconcilersFor:        enabled,
	}); err != nil {
		return fmt.Errorf("registering the injectors: %w", err)
	}
	return mgr.Start(ctx)
}
