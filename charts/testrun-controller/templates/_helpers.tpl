{{- define "testrun-controller.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "testrun-controller.fullname" -}}
{{- if contains (include "testrun-controller.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "testrun-controller.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "testrun-controller.labels" -}}
app.kubernetes.io/name: {{ include "testrun-controller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "testrun-controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "testrun-controller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
