#!/usr/bin/env bash
# Before a release is published (.github/workflows/release.yaml), check that the tag, the chart
# and the images agree: tag v<X.Y.Z> = Chart.yaml version = appVersion, and the chart's default
# images, as `helm template` renders them, are <prefix>/operator:<X.Y.Z> and
# <prefix>/trainer:<X.Y.Z> (the images the workflow pushes). Tested by tests/chart/test_release.py.
#
# Usage: hack/check-release-versions.sh TAG [IMAGE_PREFIX]
# (HELM: the helm binary, default helm; KUBETUNE_CHART: the chart folder, default charts/kubetune)
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:?usage: $0 TAG [IMAGE_PREFIX]}
PREFIX=${2:-ghcr.io/kubetune}
HELM=${HELM:-helm}
CHART=${KUBETUNE_CHART:-charts/kubetune}
fail() { echo "release check: $*" >&2; exit 1; }

[[ $TAG =~ ^v([0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?)$ ]] || fail "tag $TAG is not v<semver>"
VERSION=${BASH_REMATCH[1]}
chart_field() { awk -v key="$1:" 'index($0, key) == 1 {gsub(/"/, "", $2); print $2}' "$CHART/Chart.yaml"; }
CHART_VERSION=$(chart_field version)
APP_VERSION=$(chart_field appVersion)
[ "$CHART_VERSION" = "$VERSION" ] || fail "$CHART/Chart.yaml version is $CHART_VERSION, the tag says $VERSION"
[ "$APP_VERSION" = "$VERSION" ] || fail "$CHART/Chart.yaml appVersion is $APP_VERSION, the tag says $VERSION"

RENDERED=$("$HELM" template kubetune "$CHART" --namespace kubetune-system)
OPERATOR=$(awk '$1 == "image:" {gsub(/"/, "", $2); print $2; exit}' <<<"$RENDERED")
TRAINER=$(awk '/name: KUBETUNE_TRAINER_IMAGE/ {getline; gsub(/"/, "", $2); print $2; exit}' <<<"$RENDERED")
[ "$OPERATOR" = "$PREFIX/operator:$VERSION" ] \
  || fail "the chart's default operator image is ${OPERATOR:-missing}, expected $PREFIX/operator:$VERSION"
[ "$TRAINER" = "$PREFIX/trainer:$VERSION" ] \
  || fail "the chart's default trainer image is ${TRAINER:-missing}, expected $PREFIX/trainer:$VERSION"
echo "release check: $TAG: chart $CHART_VERSION, appVersion $APP_VERSION, images $OPERATOR and $TRAINER"
