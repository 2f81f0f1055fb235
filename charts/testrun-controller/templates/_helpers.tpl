{{- define "testrun-controller.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "testrun-controller.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "testrun-controller.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "testrun-controller.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "testrun-controller.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "testrun-controller.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- /* The agent Service; its EndpointSlice is "<this>-leader". */ -}}
{{- define "testrun-controller.agentService" -}}
{{- printf "%s-agent" (include "testrun-controller.fullname" .) | trunc 56 | trimSuffix "-" -}}
{{- end -}}

{{- define "testrun-controller.labels" -}}
app.kubernetes.io/name: {{ include "testrun-controller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "testrun-controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "testrun-controller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
