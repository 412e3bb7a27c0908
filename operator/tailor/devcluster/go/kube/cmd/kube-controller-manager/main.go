// Command kube-controller-manager is k8s.io/kubernetes/cmd/kube-controller-manager, built from a wrapper module so it
// can be compiled with plain "go build" (see ../../go.mod).
package main

import (
	"os"
	_ "time/tzdata" // time zone data for CronJob, as upstream main does

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
